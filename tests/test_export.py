"""Safe model files and ONNX: export_safe -> load_learner_safe round trips, every validation error, pickles refused, ONNX parity.

Every DataLoaders here is on the CPU (`device='cpu'`), as the files load (`load_learner_safe(cpu=True)`): the round trips
compare float32 on one device to 1e-5. Across devices (a CUDA learner, TF32) they are checked in tests/test_gpu.py."""
import json, os, pickle, struct, sys, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from fastai.vision.all import (DataBlock, CategoryBlock, ImageBlock, get_image_files, parent_label, RandomSplitter, Resize,
                               RandomResizedCrop, RandomResizedCropGPU, aug_transforms, Normalize, resnet18, set_seed, vision_learner, nn, Learner)
from fastai_gray.core import gray_stats
from fastai_gray.data import GrayImageBlock
from fastai_gray.learner import gray_learner
from fastai_gray.safe import (load_learner_safe, load_model_file, read_model_meta, is_safetensors, ModelFileError, PickleRefusedError,
                              MODEL_FORMAT_VERSION)
from fastai_gray.onnx import export_onnx, NormalizedGray


def _write_images(folder, n=8):
    "`n` 16-bit PNGs of 30x22 px per class: dark blobs ('a'), bright ones ('b'), stripes ('c')"
    rng = np.random.default_rng(0)
    for c, level in zip('abc', (5000, 50000, 20000)):
        (folder/c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 9000, (22, 30)) + level
            if c == 'c': a[::3] += 20000
            Image.fromarray(a.clip(0, 65535).astype(np.uint16)).save(folder/c/f'{c}{i}.png')
    return folder


@pytest.fixture(scope='module')
def folder(tmp_path_factory): return _write_images(tmp_path_factory.mktemp('export')/'images')


def _dls(folder, block=GrayImageBlock, item_tfms=Resize(24, method='squish'), batch_tfms=None):
    return DataBlock(blocks=(block, CategoryBlock), get_items=get_image_files, get_y=parent_label, splitter=RandomSplitter(0.25, seed=0),
                     item_tfms=item_tfms, batch_tfms=batch_tfms).dataloaders(folder, bs=8, num_workers=0, device='cpu')


@pytest.fixture(scope='module')
def lite0(folder, tmp_path_factory):
    "Lite0 with its real ImageNet weights, on windowed 16-bit images read over a gray background, resized to a non-square size"
    set_seed(0)
    dls = _dls(folder, GrayImageBlock(background=0.5, window=(30000., 60000.)), Resize((28, 20), method='pad', pad_mode='zeros'))
    return gray_learner(dls, 'tf_efficientnet_lite0', path=tmp_path_factory.mktemp('lite0'))


@pytest.fixture(scope='module')
def lite0_file(lite0): return lite0.export_safe('lite0.safetensors')


@pytest.fixture(scope='module')
def resnet(folder, tmp_path_factory):
    "torchvision resnet18 (pretrained=False), its DataLoaders normalized by the user, init='sum', a custom head size"
    set_seed(1)
    dls = _dls(folder, batch_tfms=[*aug_transforms(size=24, min_scale=1.), Normalize.from_stats(*gray_stats(), cuda=False)])
    return gray_learner(dls, resnet18, pretrained=False, init='sum', lin_ftrs=[64], ps=0.3, concat_pool=False,
                        path=tmp_path_factory.mktemp('resnet'))


@pytest.fixture(scope='module')
def small_file(folder, tmp_path_factory):
    "A model file of a plain resnet18 classifier, for the validation errors"
    set_seed(2)
    return gray_learner(_dls(folder), resnet18, pretrained=False).export_safe(tmp_path_factory.mktemp('small')/'small.safetensors')


def _preds(learn, files):
    with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl(files, num_workers=0))[0]


@pytest.mark.parametrize('name', [pytest.param('lite0', marks=pytest.mark.slow), 'resnet'])
def test_round_trip(name, request, folder, tmp_path):
    learn = request.getfixturevalue(name)
    fn = learn.export_safe(tmp_path/f'{name}.safetensors')
    assert fn == tmp_path/f'{name}.safetensors' and is_safetensors(fn)
    safe = load_learner_safe(fn)
    files = get_image_files(folder)[::2]
    torch.testing.assert_close(_preds(safe, files), _preds(learn, files), rtol=0, atol=1e-5)
    assert list(safe.dls.vocab) == list(learn.dls.vocab)
    arr = np.asarray(Image.open(files[0]))
    with learn.no_bar(), safe.no_bar():
        for item in (str(files[0]), Image.open(files[0]), arr, torch.from_numpy(arr.astype(np.float32) / 65535)[None]):
            want, got = learn.predict(item), safe.predict(item)
            assert got[0] == want[0]
            torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-5)
    meta = read_model_meta(fn)
    assert meta['format_version'] == MODEL_FORMAT_VERSION and meta['n_out'] == 3 and meta['vocab'] == ['a', 'b', 'c']
    assert safe.gray_config['arch'] == learn.gray_config['arch']
    assert type(load_model_file(fn)) is Learner


def test_recorded_settings(lite0_file, tmp_path):
    meta = read_model_meta(lite0_file)
    assert meta['input'] == dict(background=0.5, draft=None, window=[30000., 60000.], frame=None, size=[28, 20], method='pad',
                                 pad_mode='zeros', resamples=[2, 0], affine=None)
    assert meta['arch'] == 'tf_efficientnet_lite0' and meta['arch_source'] == 'timm' and meta['init'] == 'exact'
    assert meta['input_norm'] == [[0.5], [0.5]]


def test_resnet_settings(resnet, tmp_path):
    "Training-only augmentations are left out, aug_transforms' resample is kept; the user's Normalize and the head settings are kept"
    meta = read_model_meta(resnet.export_safe(tmp_path/'r.safetensors'))
    assert meta['input']['affine'] == dict(size=[24, 24], mode='bilinear', pad_mode='reflection', align_corners=True)
    assert meta['arch'] == 'resnet18' and meta['arch_source'] == 'fastai' and meta['init'] == 'sum'
    assert meta['model']['lin_ftrs'] == [64] and meta['model']['concat_pool'] is False
    np.testing.assert_allclose(meta['input_norm'], gray_stats(), rtol=1e-6)


# ---- the file: every validation error -----------------------------------------------------------------------------

def _parts(fn):
    raw = Path(fn).read_bytes()
    n = struct.unpack('<Q', raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]

def _write(dest, header, data):
    text = json.dumps(header).encode()
    dest.write_bytes(struct.pack('<Q', len(text)) + text + data)
    return dest

def _edited(fn, dest, change=None, drop=()):
    "A copy of model file `fn` at `dest`, its metadata fields updated by `change` (field: JSON text) and `drop` removed"
    header, data = _parts(fn)
    meta = header['__metadata__']
    meta.update(change or {})
    for k in drop: del meta[k]
    return _write(dest, header, data)

def _sub(fn, field, **kw):
    "The JSON text of the dict field `field` of `fn` with `kw` changed"
    return json.dumps({**json.loads(_parts(fn)[0]['__metadata__'][field]), **kw})


@pytest.mark.parametrize('change, drop, message', [
    ({'arch': '"resnet_9000"'}, (), "unknown fastai arch 'resnet_9000'"),
    ({'arch': '"resnet_9000"', 'arch_source': '"timm"'}, (), "unknown timm model 'resnet_9000'"),
    ({'arch': '"os.path.join"'}, (), "field 'arch' must be a model name"),
    ({'arch': '"fastai_gray.cli:main"'}, (), "field 'arch' must be a model name"),
    ({'arch': '"../evil"'}, (), "field 'arch' must be a model name"),
    ({'arch': '["resnet18"]'}, (), "field 'arch' must be a model name"),
    ({'arch': '"tf_efficientnet_lite0"'}, (), "unknown fastai arch 'tf_efficientnet_lite0'"),
    ({'arch': '"resnet18.a1_in1k"'}, (), "unknown fastai arch 'resnet18.a1_in1k'"),
    ({'arch_source': '"timm"'}, (), "of the rebuilt model is missing from the file"),  # timm's resnet18 names its tensors otherwise
    ({'arch_source': '"torchvision.models"'}, (), "field 'arch_source' must be"),
    ({'n_out': '"3"'}, (), "field 'n_out' must be an int in 1..1048576; got '3'"),
    ({'n_out': 'true'}, (), "field 'n_out' must be an int in 1.."),
    ({'n_out': 'three'}, (), "field 'n_out' is not a JSON value"),
    ({'n_out': '100000000000'}, (), "field 'n_out' must be an int in 1.."),  # no huge model is built
    ({'vocab': '[' * 100000 + ']' * 100000}, (), "field 'vocab' is not a JSON value"),
    ({'normalize': '1'}, (), "field 'normalize' must be true or false"),
    ({'init': '"avg"'}, (), "field 'init' must be"),
    ({'stats': '"imagenet"'}, (), "field 'stats' must be null or [[3 means]"),
    ({'input_stats': '[[0.5], [0]]'}, (), "field 'input_stats' must be"),
    ({'vocab': '["a", "b"]'}, (), "2 labels for n_out=3"),
    ({'vocab': '["a", "a", "b"]'}, (), "field 'vocab' must be a list of distinct"),
    ({'colour': '"red"'}, (), "unknown field 'colour'"),
    ({}, ('vocab',), "field 'vocab' is missing"),
    ({'format_version': '2'}, (), "field 'format_version' must be 1"),
    ({'format': '"pickle"'}, (), "field 'format' must be"),
    ({'task': '"detect"'}, (), "field 'task' must be"),
    ({'task': '"segment"'}, (), "field 'codes' is missing"),
])
def test_bad_metadata(small_file, tmp_path, change, drop, message):
    bad = _edited(small_file, tmp_path/'bad.safetensors', change, drop)
    with pytest.raises(ModelFileError, match=None) as e: load_learner_safe(bad)
    assert message in str(e.value) and str(bad) in str(e.value)


@pytest.mark.parametrize('field, kw, message', [
    ('model', dict(extra=1), "unknown field 'model.extra'"),
    ('model', dict(ps='0.5'), "field 'model.ps' must be a number or a list"),
    ('model', dict(lin_ftrs=[7]), "has shape"),
    ('model', dict(lin_ftrs=[10**9]), "field 'model.lin_ftrs'"),
    ('model', dict(lin_ftrs=[8] * 1000), "field 'model.lin_ftrs'"),
    ('input', dict(size='big'), "field 'input.size' must be null (no Resize) or [height, width]"),
    ('input', dict(window=[0, -1]), "field 'input.window'"),
    ('input', dict(method='stretch'), "field 'input.method'"),
    ('input', dict(background=2), "field 'input.background' must be a number in [0, 1]"),
    ('input', dict(resamples=[99, 0]), "field 'input.resamples'"),
])
def test_bad_nested_metadata(small_file, tmp_path, field, kw, message):
    bad = _edited(small_file, tmp_path/'bad.safetensors', {field: _sub(small_file, field, **kw)})
    with pytest.raises(ModelFileError) as e: load_learner_safe(bad)
    assert message in str(e.value)


def _with_tensors(fn, dest, change):
    "A copy of model file `fn` with its tensors changed by `change(state)`, same metadata"
    from safetensors.torch import load_file, save_file
    state = load_file(str(fn))
    change(state)
    save_file(state, str(dest), metadata=_parts(fn)[0]['__metadata__'])
    return dest


@pytest.mark.parametrize('change, message', [
    (lambda s: s.pop('1.8.weight'), "tensor '1.8.weight' (3, 512) of the rebuilt model is missing"),
    (lambda s: s.update({'1.8.weight': torch.zeros(4, 512)}), "tensor '1.8.weight' has shape (4, 512); the rebuilt model's is (3, 512)"),
    (lambda s: s.update({'1.8.weight': s['1.8.weight'].double()}), "tensor '1.8.weight' is torch.float64"),
    (lambda s: s.update({'evil': torch.zeros(1)}), "tensor 'evil' is not in the rebuilt model"),
])
def test_bad_tensors(small_file, tmp_path, change, message):
    with pytest.raises(ModelFileError) as e: load_learner_safe(_with_tensors(small_file, tmp_path/'bad.safetensors', change))
    assert message in str(e.value)


def test_bad_tensor_entry(small_file, tmp_path):
    header, data = _parts(small_file)
    header['1.8.weight']['dtype'] = 'X99'
    with pytest.raises(ModelFileError, match="tensor '1.8.weight' has an entry safetensors does not describe"):
        load_learner_safe(_write(tmp_path/'bad.safetensors', header, data))


def test_not_a_model_file(small_file, tmp_path):
    for name, data in [('empty.safetensors', b''), ('text.safetensors', b'hello world, not a model'),
                       ('json.safetensors', struct.pack('<Q', 2) + b'[]'), ('huge.safetensors', struct.pack('<Q', 2**60) + b'{}'),
                       ('pickle.safetensors', pickle.dumps({'a': 1}))]:
        (tmp_path/name).write_bytes(data)
        assert not is_safetensors(tmp_path/name)
        with pytest.raises(ModelFileError, match='is not a safetensors file'): load_learner_safe(tmp_path/name)
    from safetensors.torch import save_file
    save_file({'w': torch.zeros(2)}, str(tmp_path/'plain.safetensors'))
    with pytest.raises(ModelFileError, match='without fastai_gray metadata'): load_learner_safe(tmp_path/'plain.safetensors')
    raw = small_file.read_bytes()
    (tmp_path/'cut.safetensors').write_bytes(raw[:len(raw) // 2])  # header intact, data cut short
    with pytest.raises(ModelFileError, match='damaged'): load_learner_safe(tmp_path/'cut.safetensors')


# ---- pickles ------------------------------------------------------------------------------------------------------

class _Evil:
    "A pickle that creates a marker file when loaded"
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('name', ['evil.pkl', 'evil.pth', 'evil.safetensors', 'evil'])
def test_crafted_pickle_refused(tmp_path, name):
    marker = tmp_path/'marker'
    (tmp_path/name).write_bytes(pickle.dumps(_Evil(marker)))
    torch.save({'x': _Evil(marker)}, tmp_path/f'zip-{name}')  # torch.save's zip format
    for fn in (tmp_path/name, tmp_path/f'zip-{name}'):
        with pytest.raises(PickleRefusedError) as e: load_model_file(fn)
        assert '--trust-pickle' in str(e.value) and 'runs whatever code' in str(e.value) and str(fn) in str(e.value)
    assert not marker.exists()


def test_trust_pickle(lite0, folder, tmp_path):
    lite0.export(tmp_path/'learner.pkl')
    with pytest.raises(PickleRefusedError): load_model_file(tmp_path/'learner.pkl')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn = load_model_file(tmp_path/'learner.pkl', trust_pickle=True)
    assert any('insecure pickle' in str(o.message) for o in w)
    files = get_image_files(folder)[:4]
    torch.testing.assert_close(_preds(learn, files), _preds(lite0, files), rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match='does not exist'): load_model_file(tmp_path/'none.safetensors')


# ---- what export_safe refuses to write ----------------------------------------------------------------------------

def test_export_errors(folder, tmp_path):
    dls = _dls(folder)
    with pytest.raises(ValueError, match='made by gray_learner'):
        vision_learner(dls, resnet18, pretrained=False, n_in=1).export_safe(tmp_path/'x.safetensors')
    with pytest.raises(ValueError, match='custom callable'):
        gray_learner(dls, lambda pretrained=False, **kw: resnet18(), pretrained=False).export_safe(tmp_path/'x.safetensors')
    with pytest.raises(ValueError, match='differs from this learner'):
        gray_learner(dls, resnet18, pretrained=False, custom_head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 3))
                     ).export_safe(tmp_path/'x.safetensors')
    with pytest.raises(ValueError, match='RandomResizedCrop'):
        gray_learner(_dls(folder, item_tfms=RandomResizedCrop(24)), resnet18, pretrained=False).export_safe(tmp_path/'x.safetensors')
    with pytest.raises(ValueError, match='RandomResizedCropGPU'):
        gray_learner(_dls(folder, batch_tfms=RandomResizedCropGPU(20)), resnet18, pretrained=False).export_safe(tmp_path/'x.safetensors')
    with pytest.raises(ValueError, match='gray block'):  # RGB DataLoaders with GrayCallback: read through PILImage.create
        gray_learner(_dls(folder, block=ImageBlock), resnet18, pretrained=False).export_safe(tmp_path/'x.safetensors')
    learn = gray_learner(dls, resnet18, pretrained=False)
    learn.loss_func = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match='softmax'): learn.export_safe(tmp_path/'x.safetensors')
    assert not (tmp_path/'x.safetensors').exists()


# ---- ONNX ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_onnx(lite0, lite0_file, folder, tmp_path):
    "The real Lite0: ONNX Runtime equals PyTorch to 1e-4 at the training size and an odd non-square one, batches of 1 and 3"
    import onnx, onnxruntime as ort
    safe = load_learner_safe(lite0_file)
    fn = export_onnx(safe, tmp_path/'lite0.onnx')
    onnx.checker.check_model(str(fn))
    sess = ort.InferenceSession(str(fn), providers=['CPUExecutionProvider'])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta['vocab']) == ['a', 'b', 'c'] and json.loads(meta['input_norm']) == [[0.5], [0.5]]
    net = NormalizedGray(lite0.model.eval(), [[0.5], [0.5]])
    with torch.no_grad():
        for shape in [(1, 1, 28, 20), (3, 1, 28, 20), (1, 1, 37, 23), (3, 1, 37, 23)]:
            x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
            y, yo = net(x), torch.from_numpy(sess.run(None, {'image': x.numpy()})[0])
            assert yo.shape == (shape[0], 3)
            assert ((yo - y).abs().max() / y.abs().max()).item() < 1e-4, shape
    # the whole pipeline: the learner's batch before normalization, through ONNX, softmaxed, is what get_preds gives
    files = get_image_files(folder)[:5]
    dl = safe.dls.test_dl(files, num_workers=0)
    x = dl.one_batch()[0] * 0.5 + 0.5
    probs = torch.from_numpy(sess.run(None, {'image': x.numpy()})[0]).softmax(1)
    torch.testing.assert_close(probs, _preds(safe, files), rtol=0, atol=1e-5)


def test_onnx_extra_missing(lite0, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnx', None)
    with pytest.raises(ModuleNotFoundError, match=r'fastai_gray\[onnx\]'): export_onnx(lite0, tmp_path/'x.onnx')
    assert not (tmp_path/'x.onnx').exists()


# ---- segmentation: U-Nets ----------------------------------------------------------------------------------------

from fastai.vision.all import ColReader, DataBlock as _DataBlock, IndexSplitter, TensorMask, CrossEntropyLossFlat
from fastai_gray.datasets import digits_segmentation_dataset, segmentation_items
from fastai_gray.masks import GrayMaskBlock
from fastai_gray.unet import gray_unet_learner
from fastai_gray.train import predict_files, train_gray


@pytest.fixture(scope='module')
def seg_data(tmp_path_factory):
    "16 digit images of 40x40 px and their 0/1 masks, with codes"
    root = digits_segmentation_dataset(tmp_path_factory.mktemp('seg')/'digits', n=16, size=40)
    images, masks, codes, valid = segmentation_items(root)
    return root, images, masks, codes, valid


def _seg_dls(seg_data, codes='data', size=(36, 44), mask_block=GrayMaskBlock):
    "DataLoaders of the digits and their masks, squished to a non-square `size`"
    import pandas as pd
    _, images, masks, data_codes, valid = seg_data
    block = mask_block(data_codes if codes == 'data' else codes)
    return _DataBlock(blocks=(GrayImageBlock, block), get_x=ColReader('image'), get_y=ColReader('mask'), splitter=IndexSplitter(valid),
                      item_tfms=Resize(size, method='squish')).dataloaders(pd.DataFrame(dict(image=images, mask=masks)), bs=4, num_workers=0,
                                                                                device='cpu')


@pytest.fixture(scope='module')
def seg_resnet(seg_data, tmp_path_factory):
    "A small U-Net: torchvision resnet18 (pretrained=False) up to layer2"
    set_seed(3)
    return gray_unet_learner(_seg_dls(seg_data), resnet18, pretrained=False, cut=-4, path=tmp_path_factory.mktemp('seg_resnet'))


@pytest.fixture(scope='module')
def seg_lite0(seg_data, tmp_path_factory):
    "A U-Net on the real Lite0 with its packaged ImageNet weights, self-attention and SiLU in the decoder"
    set_seed(4)
    return gray_unet_learner(_seg_dls(seg_data), 'tf_efficientnet_lite0', self_attention=True, act_cls=nn.SiLU,
                             path=tmp_path_factory.mktemp('seg_lite0'))


@pytest.fixture(scope='module')
def seg_file(seg_resnet): return seg_resnet.export_safe('seg.safetensors')


def _same_masks(a, b):
    "Whether two `predict_files` frames hold the same files, no errors, and equal masks"
    return (list(a['file']) == list(b['file']) and a['error'].isna().all() and b['error'].isna().all()
            and all(x.shape == y.shape and (x == y).all() for x, y in zip(a['mask'], b['mask'])))


def _check_seg_round_trip(learn, fn, files):
    "The learner in model file `fn` predicts what `learn` predicts: get_preds, predict of any input, predict_files' masks"
    safe, codes = load_learner_safe(fn), read_model_meta(fn)['codes']
    assert list(safe.dls.vocab) == codes and safe.gray_config['task'] == 'segment'
    want = _preds(learn, files)
    assert want.shape == (len(files), len(codes), 36, 44)
    torch.testing.assert_close(_preds(safe, files), want, rtol=0, atol=1e-5)
    arr = np.asarray(Image.open(files[0]))
    with learn.no_bar(), safe.no_bar():
        for item in (str(files[0]), Path(files[0]), Image.open(files[0]), arr):
            (m, dec, p), (m2, dec2, p2) = learn.predict(item), safe.predict(item)
            assert type(m2) is TensorMask and m2.shape == m.shape and bool((m2 == m).all()) and bool((dec2 == dec).all())
            assert getattr(m2, 'codes', None) == codes
            torch.testing.assert_close(p2, p, rtol=0, atol=1e-5)
    ours, theirs = predict_files(learn, files), predict_files(safe, files)
    assert _same_masks(ours, theirs) and theirs['mask'][0].shape == arr.shape[:2]  # at the image's own size
    return safe


@pytest.mark.parametrize('name', ['seg_resnet', pytest.param('seg_lite0', marks=pytest.mark.slow)])
def test_segment_round_trip(name, request, seg_data, tmp_path):
    learn = request.getfixturevalue(name)
    fn = learn.export_safe(tmp_path/f'{name}.safetensors')
    meta = read_model_meta(fn)
    assert meta['task'] == 'segment' and meta['codes'] == ['background', 'digit'] and meta['n_out'] == 2 and 'vocab' not in meta
    assert meta['model']['img_size'] == [36, 44] and meta['input']['size'] == [36, 44] and meta['input']['method'] == 'squish'
    if name == 'seg_lite0':
        assert meta['arch'] == 'tf_efficientnet_lite0' and meta['arch_source'] == 'timm' and meta['model']['act_cls'] == 'SiLU'
        assert meta['model']['self_attention'] is True and meta['model']['cut'] is None
    else: assert meta['arch'] == 'resnet18' and meta['arch_source'] == 'fastai' and meta['model']['cut'] == -4
    assert _check_seg_round_trip(learn, fn, seg_data[1][::3]).dls.vocab == seg_data[3]
    assert type(load_model_file(fn)) is Learner


@pytest.mark.slow
def test_segment_trained_round_trip(seg_data, tmp_path):
    "A U-Net trained by `train_gray` (dls.vocab = codes, Resize squish), saved and loaded, predicts the same masks for `fastai-gray predict`"
    learn = train_gray(seg_data[0], task='segment', arch='resnet18', pretrained=False, epochs=1, size=32, bs=8, progress=False)
    learn.path = tmp_path
    learn.dls.cpu(), learn.model.cpu()  # trained on the default device (a GPU if any); compared with the CPU-loaded file to 1e-5
    safe = load_learner_safe(learn.export_safe('trained.safetensors'))
    files = seg_data[1][:5]
    torch.testing.assert_close(_preds(safe, files), _preds(learn, files), rtol=0, atol=1e-5)
    ours, theirs = predict_files(learn, files, bs=2), predict_files(safe, files, bs=2)
    assert _same_masks(ours, theirs) and theirs['mask'][0].shape == (40, 40)


@pytest.mark.parametrize('field, kw, message', [
    ('model', dict(act_cls='os.system'), "field 'model.act_cls' must be one of 'ReLU'"),
    ('model', dict(act_cls='Softplus'), "field 'model.act_cls' must be one of"),  # a torch.nn class, but not in the closed list
    ('model', dict(act_cls=['ReLU']), "field 'model.act_cls'"),
    ('model', dict(norm_type='Layer'), "field 'model.norm_type' must be null or one of 'Batch'"),
    ('model', dict(model_kwargs={'pretrained_cfg_overlay': {'file': '/etc/passwd'}}), "field 'model.model_kwargs'"),
    ('model', dict(model_kwargs={'drop_rate': 5}), "field 'model.model_kwargs'"),
    ('model', dict(model_kwargs=[]), "field 'model.model_kwargs'"),
    ('model', dict(img_size=[36]), "field 'model.img_size' must be [height, width]"),
    ('model', dict(img_size=[10**9, 10**9]), "field 'model.img_size'"),  # no huge dummy batch is built
    ('model', dict(blur='no'), "field 'model.blur' must be true or false"),
    ('model', dict(y_range=[0]), "field 'model.y_range'"),
    ('model', dict(concat_pool=True), "unknown field 'model.concat_pool'"),  # a classifier's head setting
    ('model', dict(bottle=True), "has shape"),  # valid, but not the model whose tensors the file holds
    ('model', dict(self_attention=True, cut=-3), "missing from the file"),
    ('input', dict(method='stretch'), "field 'input.method'"),
])
def test_bad_segment_metadata(seg_file, tmp_path, field, kw, message):
    bad = _edited(seg_file, tmp_path/'bad.safetensors', {field: _sub(seg_file, field, **kw)})
    with pytest.raises(ModelFileError) as e: load_learner_safe(bad)
    assert message in str(e.value) and str(bad) in str(e.value)


@pytest.mark.parametrize('change, drop, message', [
    ({'codes': '["background"]'}, (), "1 labels for n_out=2"),
    ({'codes': '["a", "b", "c"]'}, (), "3 labels for n_out=2"),
    ({'codes': '"background digit"'}, (), "field 'codes' must be a list of distinct"),
    ({'codes': '[true, false]'}, (), "field 'codes' must be a list of distinct"),
    ({'codes': '["a", "a"]'}, (), "field 'codes' must be a list of distinct"),
    ({'codes': '[{"a": 1}, "b"]'}, (), "field 'codes' must be a list of distinct"),
    ({}, ('codes',), "field 'codes' is missing"),
    ({'vocab': '["background", "digit"]'}, (), "unknown field 'vocab'"),
    ({'task': '"classify"'}, (), "field 'vocab' is missing"),
    ({'n_out': '3', 'codes': '["a", "b", "c"]'}, (), "has shape"),
])
def test_bad_segment_fields(seg_file, tmp_path, change, drop, message):
    bad = _edited(seg_file, tmp_path/'bad.safetensors', change, drop)
    with pytest.raises(ModelFileError) as e: load_learner_safe(bad)
    assert message in str(e.value) and str(bad) in str(e.value)


class _MyReLU(nn.ReLU): pass


def test_segment_export_errors(seg_data, tmp_path):
    "What export_safe refuses to write for a U-Net, before writing anything"
    dls = _seg_dls(seg_data)
    with pytest.raises(ValueError, match='act_cls is a custom object'):
        gray_unet_learner(dls, resnet18, pretrained=False, cut=-4, act_cls=_MyReLU).export_safe(tmp_path/'x.safetensors')
    with pytest.raises(ValueError, match=r"field 'model.act_cls' must be one of .*from this learner's settings"):
        gray_unet_learner(dls, resnet18, pretrained=False, cut=-4, act_cls=nn.Softplus).export_safe(tmp_path/'x.safetensors')
    learn = gray_unet_learner(dls, resnet18, pretrained=False, cut=-4)
    learn.loss_func = CrossEntropyLossFlat()  # softmax over the last axis: the width, not the classes
    with pytest.raises(ValueError, match='axis=1'): learn.export_safe(tmp_path/'x.safetensors')
    with pytest.raises(ValueError, match='codes'):  # a mask block without codes, no dls.vocab
        gray_unet_learner(_seg_dls(seg_data, codes=None), resnet18, pretrained=False, cut=-4, n_out=2).export_safe(tmp_path/'x.safetensors')
    assert not (tmp_path/'x.safetensors').exists()


@pytest.mark.parametrize('block', ['gray', 'fastai'])
def test_segment_codes_from_block(block, seg_data, tmp_path):
    "Without dls.vocab the codes come from the mask block: GrayMaskBlock(codes) or fastai's MaskBlock(codes)"
    from fastai.vision.all import MaskBlock
    dls = _seg_dls(seg_data, codes=['bg', 'fg'], mask_block=GrayMaskBlock if block == 'gray' else MaskBlock)
    learn = gray_unet_learner(dls, resnet18, pretrained=False, cut=-4, path=tmp_path)
    fn = learn.export_safe('c.safetensors')
    assert read_model_meta(fn)['codes'] == ['bg', 'fg']
    files = seg_data[1][:3]
    torch.testing.assert_close(_preds(load_learner_safe(fn), files), _preds(learn, files), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['seg_resnet', 'seg_lite0'])
def test_segment_onnx(name, request, tmp_path):
    "Per-pixel logits: ONNX Runtime equals PyTorch to 1e-4 (relative) at the training size and an odd non-square one, batches of 1 and 3"
    import onnx, onnxruntime as ort
    learn = request.getfixturevalue(name)
    fn = export_onnx(learn, tmp_path/'seg.onnx')
    onnx.checker.check_model(str(fn))
    sess = ort.InferenceSession(str(fn), providers=['CPUExecutionProvider'])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta['codes']) == ['background', 'digit'] and json.loads(meta['task']) == 'segment'
    norm = json.loads(meta['input_norm'])
    net = NormalizedGray(learn.model.eval(), norm)
    with torch.no_grad():
        for shape in [(1, 1, 36, 44), (3, 1, 36, 44), (1, 1, 45, 31), (3, 1, 45, 31)]:
            x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
            y, yo = net(x), torch.from_numpy(sess.run(None, {'image': x.numpy()})[0])
            assert yo.shape == (shape[0], 2, *shape[2:])
            assert ((yo - y).abs().max() / y.abs().max()).item() < 1e-4, shape


def test_model_file_has_the_users_permissions(tmp_path):
    "export_safe's file is readable as the user's other new files are (safetensors alone writes it owner-only)"
    import os, stat
    from fastai.vision.all import DataBlock, CategoryBlock, parent_label, Resize
    from fastai_gray.all import GrayImageBlock, gray_learner
    for c in 'ab':
        (tmp_path/c).mkdir()
        for i in range(2): Image.fromarray(np.full((8, 8), 40 * i + 100 * (c == 'b'), np.uint8)).save(tmp_path/c/f'{i}.png')
    dls = DataBlock(blocks=(GrayImageBlock, CategoryBlock), get_items=lambda p: sorted(p.rglob('*.png')), get_y=parent_label,
                    splitter=lambda o: (list(range(len(o))), [0]), item_tfms=Resize(16)).dataloaders(tmp_path, bs=2, num_workers=0, device='cpu')
    learn = gray_learner(dls, 'resnet18', pretrained=False)
    umask = os.umask(0o022); os.umask(umask)
    path = learn.export_safe(tmp_path/'m.safetensors')
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
