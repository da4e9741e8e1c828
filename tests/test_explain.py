"Heatmaps: maps at each source image's size and orientation, on the evidence, for named targets, torchvision/timm/ViT archs, safe files, and the learner left as it was."
import sys
import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image
from fastai.vision.all import (DataBlock, CategoryBlock, ImageBlock, Learner, Resize, RandomResizedCrop, RandomResizedCropGPU,
                               aug_transforms, resnet18)
from fastai_gray.all import GrayImageBlock, gray_learner, gray_image, load_learner_safe, heatmaps, default_layer, EXPLAIN_EXTRA

H, W, S = 60, 90, 12  # non-square images, a bright S-pixel square on dark noise


def spot_image(rng, h=H, w=W):
    "Dark noise with a bright square at a random place away from the sides (a centred crop keeps it, a reflection pad does not mirror it), and its centre (row, col)"
    a = rng.integers(0, 10, (h, w)).astype(np.uint8)
    y, x = int(rng.integers(h // 6, h - h // 6 - S)), int(rng.integers(w // 6, w - w // 6 - S))
    a[y:y + S, x:x + S] = 255
    return a, (y + S / 2, x + S / 2)


def spot_model():
    "Says 'spot' by its brightest 5x5 patch (a box filter, a max pool), so its evidence is the square and nothing else"
    conv = nn.Conv2d(1, 1, 5, padding=2, bias=False); nn.init.constant_(conv.weight, 1 / 25)
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad(): head[2].weight[:], head[2].bias[:] = torch.tensor([[-4.], [4.]]), torch.tensor([1., -1.])
    return nn.Sequential(nn.Sequential(conv, nn.ReLU()), head)


def spot_learner(items, item_tfms, batch_tfms=None):
    dblock = DataBlock((GrayImageBlock, CategoryBlock(vocab=['clear', 'spot'])), get_y=lambda a: 'spot', item_tfms=item_tfms, batch_tfms=batch_tfms)
    return Learner(dblock.dataloaders(items, bs=4), spot_model())


@pytest.fixture(scope='module')
def spots():
    rng = np.random.default_rng(1)
    return [spot_image(rng) for _ in range(6)]


def assert_on_squares(maps, centres, shape=(H, W)):
    "Each map at `shape`, in [0, 1], its peak on its square (which at full resolution is a plateau) and most of its mass within 4 pixels of the square"
    for m, (cy, cx) in zip(maps, centres, strict=True):
        assert m.shape == shape and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
        py, px = np.unravel_index(m.argmax(), m.shape)
        assert abs(py + 0.5 - cy) <= S / 2 + 1 and abs(px + 0.5 - cx) <= S / 2 + 1, ((py, px), (cy, cx))
        near = m[int(cy - S / 2 - 4):int(cy + S / 2 + 4), int(cx - S / 2 - 4):int(cx + S / 2 + 4)]
        assert near.sum() > 0.5 * m.sum(), near.sum() / m.sum()


@pytest.mark.parametrize('tfm', [Resize(32, method='squish'), Resize(32, method='crop'), Resize(32, method='pad'),
                                 Resize((24, 40), method='crop'), Resize((40, 24), method='pad'), RandomResizedCrop(32)],
                         ids=['squish', 'crop', 'pad', 'crop-wide', 'pad-tall', 'random-resized-crop'])
def test_maps_lie_on_the_evidence(spots, tfm):
    "A model whose only evidence is the square: each map peaks on it, at the source size, through every resize (a transposed or flipped mapping fails)"
    items, centres = zip(*spots)
    hm = heatmaps(spot_learner(items, tfm), items, bs=4)
    assert hm.layer == '0' and hm.preds == [1] * len(items)
    assert_on_squares(hm, centres)
    if getattr(tfm, 'method', None) == 'crop' and tfm.size == (32, 32): assert hm[0][:, :15].max() == 0 and hm[0][:, 75:].max() == 0  # cropped away: 0


@pytest.mark.parametrize('batch_tfms', [[RandomResizedCropGPU(24, ratio=(1, 1))], aug_transforms(size=(24, 40))], ids=['random-resized-crop-gpu', 'aug_transforms-size'])
def test_batch_resizes(spots, batch_tfms):
    "Batch transforms that crop or resample at inference are followed back too"
    items, centres = zip(*spots)
    hm = heatmaps(spot_learner(items, Resize((48, 72), method='squish'), batch_tfms), items, bs=4)
    assert_on_squares(hm, centres)


def test_images_of_several_sizes_without_resize(spots):
    "Without a Resize the model takes each image at its own size: images of one size share a batch, and each map is at its image's size"
    items, centres = zip(*spots)
    learn = spot_learner(items, None)
    tall = [a.T.copy() for a in items[:2]]
    hm = heatmaps(learn, [items[0], *tall, items[1], items[2]], bs=4)
    assert_on_squares(hm[:1] + hm[3:], [centres[0], centres[1], centres[2]])
    assert_on_squares(hm[1:3], [c[::-1] for c in centres[:2]], shape=(W, H))


def test_exif_rotated_and_every_item_kind(spots, tmp_path):
    "A file stored sideways with EXIF orientation 6 gets a map of its upright size, on the square; bytes, PIL images, arrays and tensors too"
    (a, centre), *_ = spots
    learn = spot_learner([a], Resize(32))
    exif = Image.Exif(); exif[0x0112] = 6  # shown turned a quarter clockwise: stored turned back
    Image.fromarray(a).transpose(Image.Transpose.ROTATE_90).save(tmp_path/'side.png', exif=exif)
    Image.fromarray(a).save(tmp_path/'up.png')
    assert Image.open(tmp_path/'side.png').size == (H, W) and gray_image(tmp_path/'side.png').size == (W, H)
    items = [tmp_path/'side.png', str(tmp_path/'up.png'), (tmp_path/'up.png').read_bytes(), Image.fromarray(a), a, torch.from_numpy(a)]
    maps = [heatmaps(learn, [o])[0] for o in items]
    assert_on_squares(maps, [centre] * len(items))
    for m in maps[1:]: np.testing.assert_allclose(m, maps[0], atol=1e-6)


def test_targets_by_name_and_index(spots):
    items, _ = zip(*spots)
    learn = spot_learner(items, Resize(32))
    by_name, by_index = heatmaps(learn, items[:2], target='spot'), heatmaps(learn, items[:2], target=1)
    assert by_name.targets == by_index.targets == [1, 1]
    for a, b, c in zip(by_name, by_index, heatmaps(learn, items[:2])): np.testing.assert_array_equal(a, b); np.testing.assert_array_equal(a, c)
    clear = heatmaps(learn, items[:2], target='clear')
    assert clear.targets == [0, 0] and clear.preds == [1, 1] and max(m.max() for m in clear) == 0  # no evidence for 'clear' anywhere
    with pytest.raises(ValueError, match=r"its classes are \['clear', 'spot'\]"): heatmaps(learn, items, target='cat')
    with pytest.raises(ValueError, match='out of range'): heatmaps(learn, items, target=2)
    with pytest.raises(ValueError, match='the methods are gradcam, hirescam'): heatmaps(learn, items, method='gradcam3')
    with pytest.raises(ValueError, match="layer 'body' is not a module"): heatmaps(learn, items, layer='body')
    with pytest.raises(TypeError, match=r'for one image give \[item\]'): heatmaps(learn, items[0])


@pytest.mark.parametrize('method', ['hirescam', 'gradcam++', 'xgradcam', 'layercam', 'eigencam', 'scorecam'])
def test_methods(spots, method):
    items, centres = zip(*spots)
    hm = heatmaps(spot_learner(items, Resize(32)), items[:2], method=method)
    assert hm.method == method
    assert_on_squares(hm, centres[:2])


def test_learner_left_as_it_was(spots):
    "Modes (per module), gradients, requires_grad flags: as before; no hook left; inside `torch.no_grad` too"
    items, _ = zip(*spots)
    learn = spot_learner(items, Resize(32))
    m = learn.model
    m.train(); m[1].eval(); m[1][2].weight.requires_grad_(False)
    g = torch.full_like(m[0][0].weight, 3.); m[0][0].weight.grad = g
    with torch.no_grad(): hm = heatmaps(learn, items[:2])
    assert_on_squares(hm, [c for _, c in spots[:2]])
    assert m.training and m[0].training and not m[1].training and not m[1][2].training
    assert m[0][0].weight.grad is g and torch.equal(g, torch.full_like(g, 3.)) and m[1][2].weight.grad is None and m[1][2].bias.grad is None
    assert not m[1][2].weight.requires_grad and m[0][0].weight.requires_grad
    assert all(not (o._forward_hooks or o._backward_hooks or o._forward_pre_hooks) for o in m.modules())


def _gray_dls(items, size=64, block=GrayImageBlock):
    return DataBlock((block, CategoryBlock), get_y=lambda a: 'a' if a.flat[0] > 128 else 'b', item_tfms=Resize(size)).dataloaders(items, bs=2)


@pytest.fixture(scope='module')
def noise():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 70)).astype(np.uint8) for _ in range(4)]


@pytest.mark.parametrize('arch', [resnet18, 'resnet10t', 'convnext_atto'], ids=['torchvision-resnet18', 'timm-resnet10t', 'timm-convnext_atto'])
def test_archs(noise, arch):
    "The body's output for torchvision and timm CNNs, frozen or not: maps at the source size, not flat"
    learn = gray_learner(_gray_dls(noise), arch, pretrained=False)
    learn.freeze()
    assert default_layer(learn.model) == '0'
    hm = heatmaps(learn, noise, method='eigencam')
    assert hm.layer == '0' and [m.shape for m in hm] == [(40, 70)] * 4 and all(m.max() > 0.9 for m in hm)
    assert heatmaps(learn, noise[:1], target=0)[0].shape == (40, 70)


def test_vit_tokens(noise):
    "A timm ViT: the last block's norm1, its tokens laid on the patch grid"
    learn = gray_learner(_gray_dls(noise, 32), 'vit_tiny_patch16_224', pretrained=False, img_size=32)
    hm = heatmaps(learn, noise[:2], method='eigencam')
    assert hm.layer == '0.model.blocks.11.norm1' and [m.shape for m in hm] == [(40, 70)] * 2 and all(m.max() > 0.9 for m in hm)


def test_one_by_one_map_is_an_error(noise):
    learn = gray_learner(_gray_dls(noise, 32), resnet18, pretrained=False)
    with pytest.raises(ValueError, match='makes a 1x1 map'): heatmaps(learn, noise[:1])


def test_rgb_batches_through_gray_callback(noise):
    "3-channel DataLoaders: the model's input is made by the learner's GrayCallback, as in training"
    rgb = [np.stack([a] * 3, -1) for a in noise]
    learn = gray_learner(_gray_dls(rgb, block=ImageBlock), resnet18, pretrained=False)
    hm = heatmaps(learn, rgb[:2], method='eigencam')
    assert [m.shape for m in hm] == [(40, 70)] * 2 and all(m.max() > 0.9 for m in hm)


@pytest.mark.slow
def test_safe_file(noise, model_file):
    "A learner from `load_learner_safe` gives the maps of the learner it was saved from"
    fn, learn = model_file
    loaded = load_learner_safe(fn)
    for a, b in zip(heatmaps(learn, noise), heatmaps(loaded, noise), strict=True): np.testing.assert_allclose(a, b, atol=1e-5)


def test_missing_library_names_the_extra(spots, monkeypatch):
    items, _ = zip(*spots)
    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "fastai_gray\[explain\]"'): heatmaps(spot_learner(items, Resize(32)), items)
    assert 'fastai_gray[explain]' in EXPLAIN_EXTRA


@pytest.mark.slow
def test_import_all_leaves_the_library_out():
    "`import fastai_gray.all` does not import pytorch-grad-cam (seconds: OpenCV, SciPy, scikit-learn)"
    import subprocess
    code = "import sys, fastai_gray.all; print('pytorch_grad_cam' in sys.modules, 'cv2' in sys.modules)"
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split() == ['False', 'False']


@pytest.fixture(scope='module')
def model_file(noise, tmp_path_factory):
    "A gray resnet18 classifier (untrained) as a safe model file, and the learner"
    learn = gray_learner(_gray_dls(noise), resnet18, pretrained=False)
    return learn.export_safe(tmp_path_factory.mktemp('model')/'m.safetensors'), learn


@pytest.mark.slow
def test_cli_heatmaps(model_file, noise, tmp_path, capsys):
    "`predict MODEL FILES --heatmaps DIR`: DIR/<stem>.png at each image's size, DICOM too; an unreadable file is reported and skipped"
    from fastai_gray.cli import main
    pydicom = pytest.importorskip('pydicom')
    from pydicom.data import get_testdata_file
    model, learn = model_file
    Image.fromarray(noise[0]).save(tmp_path/'wide.png'); Image.fromarray(noise[1].T.copy()).save(tmp_path/'tall.png')
    dcm = get_testdata_file('CT_small.dcm')
    (tmp_path/'bad.png').write_bytes(b'not a png')
    files = [tmp_path/'wide.png', tmp_path/'tall.png', dcm, tmp_path/'bad.png']
    status = main(['predict', str(model), *map(str, files), '--heatmaps', str(tmp_path/'maps'), '--bs', '2'])
    out, err = capsys.readouterr()
    assert status == 1 and 'bad.png' in err and f"wrote the heatmaps of 3 image(s) to {tmp_path/'maps'}" in err
    assert len(out.splitlines()) == 3
    assert sorted(p.name for p in (tmp_path/'maps').iterdir()) == ['CT_small.png', 'tall.png', 'wide.png']
    rows, cols = (int(v) for v in (pydicom.dcmread(dcm).Rows, pydicom.dcmread(dcm).Columns))
    for name, size in [('wide', (70, 40)), ('tall', (40, 70)), ('CT_small', (cols, rows))]:
        im = Image.open(tmp_path/'maps'/f'{name}.png')
        assert im.mode == 'RGB' and im.size == size, (name, im.mode, im.size)
    # the PNG is the image as read with the map over it at alpha 0.5: its gray part comes back from the colours, as the Python API makes it
    from fastai_gray.explain import _overlay
    hm = heatmaps(learn, [tmp_path/'wide.png'], bs=2)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path/'maps'/'wide.png')), _overlay(hm.images[0], hm[0]))


@pytest.mark.slow
def test_cli_heatmaps_errors_before_writing(model_file, noise, tmp_path, capsys):
    from fastai_gray.cli import main
    model, _ = model_file
    (tmp_path/'a').mkdir(); (tmp_path/'b').mkdir()
    Image.fromarray(noise[0]).save(tmp_path/'a'/'x.png'); Image.fromarray(noise[1]).save(tmp_path/'b'/'X.png')
    status = main(['predict', str(model), str(tmp_path/'a'/'x.png'), str(tmp_path/'b'/'X.png'), '--heatmaps', str(tmp_path/'maps')])
    out, err = capsys.readouterr()
    assert status == 1 and 'would both write heatmap' in err and out == '' and not (tmp_path/'maps').exists()
