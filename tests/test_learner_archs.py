"""`gray_learner` over fastai's `model_meta` archs, a timm name, and a torchvision-style callable with pretrained weights;
the checks moved out of nbs/04_learner.ipynb to keep that page fast: `rgb_state_dict` after training, and `GrayCallback`
on RGB DataLoaders with and without a 3-channel `Normalize`.

The DataLoaders are pinned to the CPU (`device='cpu'`): the tests call the model by hand on their batches, and compare
with the CPU's float32 to 1e-4; on a CUDA machine fastai would put the batches on the GPU and the model stay on the CPU.
tests/test_gpu.py checks the same on CUDA. Every test here runs with fastai's default device elsewhere (conftest's
`default_device_elsewhere`): what follows it instead of the DataLoaders fails on any machine, as it would on a GPU."""
import copy
import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image
from fastai.vision.all import (DataBlock, CategoryBlock, ImageBlock, RandomSplitter, Normalize, resnet18, densenet121, vgg11_bn,
                               alexnet, squeezenet1_1, imagenet_stats, get_image_files, parent_label, set_seed, vision_learner)
from fastai.vision.models.xresnet import xresnet18
from fastai_gray.all import (gray_learner, GrayImageBlock, GrayCallback, ExactGrayConv, find_first_conv, gray_stats,
                             update_first_layer, rgb_and_gray, rel_error, rgb_state_dict, lite0_checkpoint)

pytestmark = pytest.mark.usefixtures('default_device_elsewhere')


@pytest.fixture(scope='module')
def dls():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(16)]
    return DataBlock(blocks=(GrayImageBlock, CategoryBlock), get_x=lambda i: images[i], get_y=lambda i: str(i % 2),
                     splitter=RandomSplitter(0.25, seed=0)).dataloaders(list(range(16)), bs=4, num_workers=0, device='cpu')


@pytest.mark.parametrize('arch', [resnet18, xresnet18, densenet121, vgg11_bn, alexnet, squeezenet1_1, 'resnet18'],
                         ids=lambda a: a if isinstance(a, str) else a.__name__)
def test_gray_learner_builds_trains_and_splits(dls, arch):
    learn = gray_learner(dls, arch, pretrained=False)
    name, stem = find_first_conv(learn.model)
    assert isinstance(stem, ExactGrayConv)
    learn.freeze()  # the arch's splitter still finds its groups after the surgery
    assert len(learn.opt.param_groups) >= 2
    assert not stem.conv.weight.requires_grad
    learn.unfreeze()
    xb, yb = dls.one_batch()
    assert xb.shape[1] == 1
    loss = learn.loss_func(learn.model(xb), yb)
    loss.backward()
    assert stem.conv.weight.grad is not None


def test_added_normalize_is_where_the_batches_are(default_device_elsewhere):
    "The Normalize gray_learner adds holds its stats on the DataLoaders' device, not on fastai's default one (a GPU if any)"
    images = [np.full((8, 8), 30 * i, np.uint8) for i in range(8)]
    dls = DataBlock(blocks=(GrayImageBlock, CategoryBlock), get_x=lambda i: images[i], get_y=lambda i: str(i % 2),
                    splitter=RandomSplitter(0.25, seed=0)).dataloaders(list(range(8)), bs=4, num_workers=0, device='cpu')
    learn = gray_learner(dls, lambda pretrained=False: resnet18(), stats=imagenet_stats)   # "pretrained": Normalize added
    norm, = learn.dls.after_batch.fs.filter(lambda t: isinstance(t, Normalize))
    assert norm.mean.device.type == norm.std.device.type == 'cpu'
    xb, _ = learn.dls.one_batch()
    assert xb.device.type == 'cpu' and xb.mean().abs() < 3


def test_pretrained_callable_gets_converted_weights(dls):
    "A torchvision-style callable asked for pretrained weights: its first layer is converted, not re-initialized"
    def seeded_resnet18(pretrained=False):
        torch.manual_seed(0)
        return resnet18()
    reference = seeded_resnet18().conv1.weight
    learn = gray_learner(dls, seeded_resnet18, stats=imagenet_stats)
    stem = learn.model[0][0]
    (mean,), (std,) = gray_stats(imagenet_stats)
    expected = (reference * (std / torch.tensor(imagenet_stats[1])).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(stem.conv.weight, expected)
    norm = learn.dls.after_batch.fs.filter(lambda t: isinstance(t, Normalize))[0]
    assert norm.mean.flatten().tolist() == pytest.approx([mean])


@pytest.mark.parametrize('arch', [resnet18, 'resnet18', 'tf_efficientnet_lite0'], ids=str)
@pytest.mark.parametrize('cut', [-3, 5])
def test_cut_shortens_the_body_and_splits(dls, arch, cut):
    "`cut` cuts the body like `create_vision_model(cut=...)`, for torchvision and timm archs; freezing still works"
    full = gray_learner(dls, arch, pretrained=False)
    learn = gray_learner(dls, arch, pretrained=False, cut=cut)
    body = learn.model[0]
    assert isinstance(body, nn.Sequential) and len(body) < len(list(full.model[0].modules()))
    xb, yb = dls.one_batch()
    with torch.no_grad(): features = body.eval()(xb)
    assert learn.model[1][2].num_features == 2 * features.shape[1]  # concat pool of the cut body's features
    learn.freeze()
    assert len(learn.opt.param_groups) >= 2
    assert learn.gray_config['cut'] == cut
    learn.model.train()
    learn.loss_func(learn.model(xb), yb).backward()


def test_half_precision_models_convert_exactly():
    "fp16/bf16 models convert with init='exact': the check's tolerance follows the dtype"
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        m3 = resnet18().to(dtype).eval()
        m1 = update_first_layer(copy.deepcopy(m3)).eval()
        x3, x1 = rgb_and_gray(torch.rand(2, 1, 41, 53))
        with torch.no_grad(): err = rel_error(m1.conv1(x1.to(dtype)), m3.conv1(x3.to(dtype)))
        assert err < 16 * torch.finfo(dtype).eps


def folder_dls(folder, block=GrayImageBlock, batch_tfms=None):
    return DataBlock(blocks=(block, CategoryBlock), get_items=get_image_files, get_y=parent_label, splitter=RandomSplitter(0.25, seed=0),
                     batch_tfms=batch_tfms).dataloaders(folder, bs=4, num_workers=0, device='cpu')


@pytest.fixture(scope='module')
def gray_folder(tmp_path_factory, labelled_images):
    return labelled_images(tmp_path_factory.mktemp('gray'), n=6, modes=('L',), size=32)


@pytest.fixture(scope='module')
def rgb_folder(gray_folder, tmp_path_factory):
    "The gray images as RGB whose channels differ (so the luma matters), in the same class folders"
    dest = tmp_path_factory.mktemp('rgb')
    for f in get_image_files(gray_folder):
        (dest/f.parent.name).mkdir(exist_ok=True)
        a = np.asarray(Image.open(f)).astype(np.int32)
        Image.fromarray(np.stack([a, (a * 3) % 256, 255 - a], -1).astype(np.uint8)).save(dest/f.parent.name/f.name)
    return dest


def test_trained_model_back_to_rgb_is_the_same_function(gray_folder):
    "`rgb_state_dict` of a trained gray learner (ImageNet stats: both stem kernels trained) in fastai's 3-channel learner"
    dls = folder_dls(gray_folder)
    set_seed(2)
    imnet = gray_learner(dls, resnet18, pretrained=False, stats=imagenet_stats)   # as if pretrained on ImageNet-normalized input
    with imnet.no_bar(), imnet.no_logging(): imnet.fit(1, 1e-3)                    # training moves both stem kernels
    rgb_dls = folder_dls(gray_folder, ImageBlock, Normalize.from_stats(*imagenet_stats, cuda=False))
    back = vision_learner(rgb_dls, resnet18, pretrained=False)
    back.model.load_state_dict(rgb_state_dict(imnet.model))
    back.model.eval(); imnet.model.eval()
    x, x3 = dls.valid.one_batch()[0], rgb_dls.valid.one_batch()[0]   # the same files, as gray and as ImageNet-normalized RGB
    with torch.no_grad(): torch.testing.assert_close(back.model(x3), imnet.model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('norm', [None, 'imagenet'])
def test_gray_callback_feeds_what_the_gray_pipeline_gives(gray_folder, rgb_folder, norm):
    "On RGB DataLoaders (a 3-channel `Normalize` or none) the Lite0 model sees the gray batch within 1/255, trains, predicts"
    gray_dls = folder_dls(rgb_folder)   # the RGB files read as gray: PIL's luma, rounded to 8 bits
    gray_dls.add_tfms([Normalize.from_stats([.5], [.5], cuda=False)], 'after_batch')   # as gray_learner normalizes gray input for Lite0
    want = gray_dls.valid.one_batch()[0]
    dls3 = folder_dls(rgb_folder, ImageBlock, None if norm is None else Normalize.from_stats(*imagenet_stats, cuda=False))
    set_seed(0)
    learn = gray_learner(dls3, 'tf_efficientnet_lite0', pretrained_cfg_overlay=dict(file=lite0_checkpoint()))
    cb, = learn.cbs.filter(lambda c: isinstance(c, GrayCallback))
    learn.xb, learn.dl = (dls3.valid.one_batch()[0],), dls3.valid
    cb.before_batch()
    assert (learn.xb[0] - want).abs().max() * 0.5 <= 1/255 + 1e-6  # gray std 0.5 for Lite0
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4)
    with learn.no_bar(): label = learn.predict(next(rgb_folder.glob('b/*.png')))[0]
    assert label in ('a', 'b', 'c')
