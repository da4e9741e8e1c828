"""`gray_unet_learner` and gray masks: the exactness contract of the encoder (torchvision and timm, odd sizes, ImageNet
per-channel stats), 1-channel U-Nets at odd sizes, 8/16-bit masks, the mask errors, predict input kinds, save/load
(a 3-channel checkpoint too), export/load_learner. The DataLoaders are on the CPU (`device='cpu'`) and fastai's default
device elsewhere (conftest's `default_device_elsewhere`): the tests call the model by hand, as they would on a GPU machine."""
import json
import numpy as np
import pytest
import torch
from PIL import Image
from fastai.vision.all import (DataBlock, MaskBlock, RandomSplitter, FuncSplitter, get_image_files, resnet18, imagenet_stats,
                               Normalize, unet_learner, load_learner, create_body, ImageBlock, set_seed)
from fastai_gray.all import (gray_unet_learner, timm_encoder, GrayImageBlock, GrayMaskBlock, ExactGrayConv, rgb_and_gray,
                             rel_error, lite0_checkpoint, mask_items, check_masks, read_mask, arch_from_name, gray_stats)

pytestmark = pytest.mark.usefixtures('default_device_elsewhere')
SIZE = (131, 97)  # width, height: odd, so every stride rounds


def write_pairs(dest, n=8, size=SIZE, bits=8, seed=0):
    "`dest/images/*.png` gray images and `dest/masks/*.png` label masks (labels 0, 1, 2), `bits`-bit"
    rng = np.random.default_rng(seed)
    for sub in ('images', 'masks'): (dest/sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        lab = np.zeros((h, w), np.uint16 if bits == 16 else np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        lab[y:y + h // 3, x:x + w // 3] = 1 + i % 2
        img = np.clip(lab * 90 + rng.integers(0, 40, (h, w)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(dest/'images'/f'{i}.png')
        Image.fromarray(lab).save(dest/'masks'/f'{i}.png')
    return dest


def seg_dls(folder, block=None, bs=4):
    pairs = dict(mask_items(folder))
    return DataBlock(blocks=(GrayImageBlock, block or GrayMaskBlock(['bg', 'a', 'b'])), get_y=lambda f: pairs[f],
                     splitter=FuncSplitter(lambda f: f.stem in ('0', '1'))).dataloaders(list(pairs), bs=bs, num_workers=0, device='cpu')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp('seg'))


@pytest.fixture
def dls(folder): return seg_dls(folder)


def seeded_resnet18(pretrained=False):
    "A torchvision-style callable whose fixed random weights stand in for pretrained ones"
    torch.manual_seed(0)
    return resnet18()


def test_exact_torchvision_encoder_at_odd_size(dls):
    learn = gray_unet_learner(dls, seeded_resnet18, stats=imagenet_stats)
    assert isinstance(learn.model[0][0], ExactGrayConv)
    rgb = create_body(seeded_resnet18(), 3, True, -2).eval()
    g = torch.rand(2, 1, *SIZE[::-1])
    x3, x1 = rgb_and_gray(g, imagenet_stats, learn.gray_config['input_stats'])
    with torch.no_grad(): err = rel_error(learn.model[0].eval()(x1), rgb(x3))
    assert err <= 1e-5
    with torch.no_grad(): assert learn.model.eval()(x1).shape == (2, 3, SIZE[1], SIZE[0])
    norms = learn.dls.after_batch.fs.filter(lambda t: isinstance(t, Normalize))
    assert len(norms) == 1 and norms[0].mean.shape[1] == 1


@pytest.mark.slow
def test_exact_real_lite0_encoder_at_odd_size(dls):
    "The packaged ImageNet Lite0 weights, with ImageNet's per-channel stats (so the border term matters)"
    learn = gray_unet_learner(dls, 'tf_efficientnet_lite0', stats=imagenet_stats)
    rgb = timm_encoder('tf_efficientnet_lite0', pretrained=True,
                       pretrained_cfg_overlay=dict(file=str(lite0_checkpoint()))).eval()
    g = torch.rand(2, 1, *SIZE[::-1])
    x3, x1 = rgb_and_gray(g, imagenet_stats, learn.gray_config['input_stats'])
    with torch.no_grad(): err = rel_error(learn.model[0].eval()(x1), rgb(x3))
    assert err <= 1e-5
    assert learn.gray_config['input_stats'] == [list(s) for s in gray_stats(imagenet_stats)]


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['resnet18', 'convnext_atto', 'tf_efficientnet_lite0'])
def test_timm_encoders_give_input_sized_logits(dls, arch):
    learn = gray_unet_learner(dls, arch, pretrained=False)
    xb, yb = dls.one_batch()
    assert xb.shape[1] == 1
    learn.model.train()
    out = learn.model(xb)
    assert out.shape == (4, 3, SIZE[1], SIZE[0])
    learn.loss_func(out, yb).backward()
    assert learn.gray_config['arch'] == arch and learn.gray_config['task'] == 'segment'


def test_timm_encoder_is_forward_features():
    import timm
    m = timm.create_model('resnet18', pretrained=False, num_classes=0).eval()
    e = timm_encoder('resnet18', pretrained=False).eval()
    e.load_state_dict(dict(zip(e.state_dict(), m.state_dict().values())))
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad(): assert rel_error(e(x), m.forward_features(x)) < 1e-6


def test_16bit_masks_give_the_same_targets(tmp_path):
    y8 = seg_dls(write_pairs(tmp_path/'m8', bits=8)).valid.one_batch()[1]
    y16 = seg_dls(write_pairs(tmp_path/'m16', bits=16)).valid.one_batch()[1]
    assert torch.equal(y8, y16) and set(y8.unique().tolist()) <= {0, 1, 2}
    Image.fromarray(np.full((4, 4), 3, np.uint16)).save(tmp_path/'three.tif')
    assert read_mask(tmp_path/'three.tif').max() == 3


def test_out_of_range_mask_is_an_error_before_training(tmp_path):
    folder = write_pairs(tmp_path/'bad')
    Image.fromarray(np.full(SIZE[::-1], 255, np.uint8)).save(folder/'masks'/'1.png')
    with pytest.raises(ValueError, match=r"1\.png' holds label value\(s\) 255 outside range\(3\)"):
        check_masks([m for _, m in mask_items(folder)], 3)
    fastai_dls = seg_dls(folder, MaskBlock(['bg', 'a', 'b']))  # fastai's own block loads it, the learner refuses it
    with pytest.raises(ValueError, match=r"label value\(s\) 255 outside range\(3\)"):
        gray_unet_learner(fastai_dls, resnet18, pretrained=False)
    with pytest.raises(ValueError, match=r"1\.png' holds label value\(s\) 255"):
        seg_dls(folder).valid.one_batch()


def test_mask_of_another_size_is_an_error(tmp_path):
    folder = write_pairs(tmp_path/'size')
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder/'masks'/'5.png')
    with pytest.raises(ValueError, match=r"5\.png' is 10x10 \(width x height\) but its image"):
        check_masks([m for _, m in mask_items(folder)], 3, images=[i for i, _ in mask_items(folder)])
    with pytest.raises(ValueError, match=r"5\.png' is 10x10 \(width x height\) but its image is 131x97"):
        dls = seg_dls(folder)
        for i in range(len(dls.train_ds)): dls.train.do_item(i)


@pytest.mark.slow
def test_predict_input_kinds_save_load_export(dls, folder, tmp_path):
    set_seed(0)
    learn = gray_unet_learner(dls, resnet18, pretrained=False, cut=-4, path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    fn = mask_items(folder)[0][0]
    pil = Image.open(fn); arr = np.asarray(pil)
    with learn.no_bar():
        ref = learn.predict(fn)[0]
        assert ref.shape == (SIZE[1], SIZE[0])
        for x in (str(fn), pil, pil.convert('RGB'), pil.convert('RGBA'), pil.convert('P'),
                  Image.fromarray(arr.astype(np.uint16) * 257), arr, arr.astype(np.uint16) * 257, arr / 255.,
                  arr.astype(np.float32) / 255., torch.tensor(arr), torch.tensor(arr)[None]):
            assert torch.equal(learn.predict(x)[0], ref), type(x)
    learn.save('gray')
    other = gray_unet_learner(dls, resnet18, pretrained=False, cut=-4, path=tmp_path).load('gray')
    xb = dls.one_batch()[0]
    learn.model.eval(); other.model.eval()
    with torch.no_grad(): assert torch.equal(other.model(xb), learn.model(xb))
    learn.export(tmp_path/'seg.pkl')
    loaded = load_learner(tmp_path/'seg.pkl')
    with loaded.no_bar(): assert torch.equal(loaded.predict(fn)[0], ref)
    assert json.loads(json.dumps(learn.gray_config)) == learn.gray_config
    assert arch_from_name(learn.gray_config['arch']) is resnet18 and learn.gray_config['cut'] == -4


def test_three_channel_checkpoint_converts_on_load(folder, dls, tmp_path):
    "A checkpoint of fastai's 3-channel U-Net with the same encoder (and no last cross, which is sized by the input channels)"
    pairs = dict(mask_items(folder))
    rgb_dls = DataBlock(blocks=(ImageBlock, MaskBlock(['bg', 'a', 'b'])), get_y=lambda f: pairs[f],
                        splitter=FuncSplitter(lambda f: f.stem in ('0', '1'))).dataloaders(list(pairs), bs=4, num_workers=0)
    set_seed(0)
    rgb = unet_learner(rgb_dls, resnet18, pretrained=False, last_cross=False, path=tmp_path)
    rgb.save('rgb')
    gray = gray_unet_learner(dls, resnet18, pretrained=False, last_cross=False, path=tmp_path).load('rgb')
    g = torch.rand(2, 1, *SIZE[::-1])
    x3, x1 = rgb_and_gray(g, ((0.,) * 3, (1.,) * 3), gray.gray_config['input_stats'])
    rgb.model.eval(); gray.model.eval()
    with torch.no_grad(): assert rel_error(gray.model(x1), rgb.model(x3)) < 1e-5

