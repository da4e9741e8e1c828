"`gray_learner` over fastai's `model_meta` archs, a timm name, and a torchvision-style callable with pretrained weights."
import copy
import numpy as np
import pytest
import torch
from torch import nn
from fastai.vision.all import (DataBlock, CategoryBlock, RandomSplitter, Normalize, resnet18, densenet121, vgg11_bn,
                               alexnet, squeezenet1_1, imagenet_stats)
from fastai.vision.models.xresnet import xresnet18
from fastai_gray.all import (gray_learner, GrayImageBlock, ExactGrayConv, find_first_conv, gray_stats, update_first_layer,
                             rgb_and_gray, rel_error)


@pytest.fixture(scope='module')
def dls():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(16)]
    return DataBlock(blocks=(GrayImageBlock, CategoryBlock), get_x=lambda i: images[i], get_y=lambda i: str(i % 2),
                     splitter=RandomSplitter(0.25, seed=0)).dataloaders(list(range(16)), bs=4, num_workers=0)


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
