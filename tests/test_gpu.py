"""The GPU tier (marker `cuda`, `make test-gpu`): what a user with a CUDA GPU does, on tiny data, sized for under 5 minutes on one GPU.

Skipped with the reason where torch sees no CUDA GPU, and a failure instead where `CI_GPU=true` (tests/conftest.py).
Everything here runs on `DEV`, the first CUDA GPU; a bound between devices or number formats says where it comes from:
- float32 proper (TF32 off for cuDNN convolutions and matmuls, the `no_tf32` fixture): the exactness contract, 1e-5;
- PyTorch's default (TF32 for cuDNN convolutions: a 10-bit mantissa, rounding of about 5e-4 relative): 2e-3 on logits;
- fp16/bf16 autocast: 1e-2 on a layer or a model's logits; a trained model's metric within a stated margin of fp32's.
Measured when issue 18 was filed, on one H200 (PyTorch 2.11, CUDA 13): exactness 9e-7 with TF32 off, 5.5e-4 with the
default, 2.6e-3 under fp16 autocast. Names come from `fastai_gray.all`, as a user imports them."""
import contextlib, copy, json
import numpy as np
import pytest
import torch
import timm
from fastai.vision.all import (DataBlock, CategoryBlock, ImageBlock, ColReader, IndexSplitter, RandomSplitter, Resize, Normalize,
                               get_image_files, parent_label, imagenet_stats, accuracy, Dice, set_seed)
from fastai_gray.all import (GrayImageBlock, GrayMaskBlock, GrayCallback, ExactGrayConv, gray_learner, gray_unet_learner,
                             update_first_layer, find_first_conv, rgb_and_gray, rel_error, lite0_checkpoint,
                             digits_segmentation_dataset, segmentation_items, load_learner_safe, load_model_file, export_onnx,
                             NormalizedGray, build_gray_cache, heatmaps)

pytestmark = pytest.mark.cuda
DEV = torch.device('cuda')
LITE0 = 'tf_efficientnet_lite0'
# A half-precision run parts from the float32 one at its first rounding, so their metrics differ by chance: the margins
# allow three of the 18 validation images for the classifier, and 0.1 Dice for the U-Net (issue 18: 0.82 fp16, 0.85 fp32).
ACCURACY_MARGIN, DICE_MARGIN = 3 / 18, 0.1


@contextlib.contextmanager
def tf32(conv:bool, matmul:bool):
    "TF32 for cuDNN convolutions and for matmuls set as asked inside, and restored after"
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
    try: yield
    finally: torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before

@pytest.fixture
def no_tf32():
    "float32 proper on CUDA during the test: TF32 off for cuDNN convolutions and matmuls"
    with tf32(False, False): yield

@pytest.fixture
def default_tf32():
    "PyTorch's defaults during the test: TF32 for cuDNN convolutions, not for matmuls"
    with tf32(True, False): yield


def finite(learn) -> bool:
    "Whether every loss and metric the recorder kept is finite"
    return bool(np.isfinite(np.array([v for row in learn.recorder.values for v in row], dtype=float)).all())


def stem_record(learn) -> list:
    "What the gray stem does in each training forward: (output dtype, output channels_last, offset conv called)"
    stem, calls, record = find_first_conv(learn.model)[1], [], []
    stem.offset.register_forward_hook(lambda m, i, o: calls.append(1))
    def hook(m, i, o):
        if m.training: record.append((o.dtype, o.is_contiguous(memory_format=torch.channels_last), bool(calls)))
        calls.clear()
    stem.register_forward_hook(hook)
    return record


# ---------------------------------------------------------------------------------------------------- a classifier

@pytest.fixture(scope='module')
def folder(tmp_path_factory, labelled_images):
    "24 gray images of 64 px per class (dark, bright, striped): 54 to train on, 18 to validate"
    return labelled_images(tmp_path_factory.mktemp('gpu')/'images', n=24, modes=('L',), size=64)


def class_dls(folder, block=GrayImageBlock, **kw):
    return DataBlock(blocks=(block, CategoryBlock), get_items=get_image_files, get_y=parent_label, splitter=RandomSplitter(0.25, seed=0),
                     item_tfms=Resize(64), **kw).dataloaders(folder, bs=8, num_workers=0, device=DEV)


def trained(make) -> callable:
    """`run(precision)`: the learner `make(precision)` gives, trained on CUDA in 'fp32', 'fp16' or 'bf16' (the whole
    model, 8 one-cycle epochs), once per precision; with its stem's record (`stem_record`)"""
    runs = {}
    def run(precision):
        if precision not in runs:
            set_seed(0)
            learn = make(precision)
            record = stem_record(learn)
            if precision == 'fp16': learn.to_fp16()
            if precision == 'bf16': learn.to_bf16()
            learn.unfreeze()
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(8, 3e-3)
            runs[precision] = learn, record
        return runs[precision]
    return run


@pytest.fixture(scope='module')
def classifier(folder, tmp_path_factory):
    "Lite0 (its ImageNet weights) on the gray images, by precision (`trained`): accuracy 0.94 in float32 on the CPU"
    return trained(lambda p: gray_learner(class_dls(folder), LITE0, metrics=accuracy, path=tmp_path_factory.mktemp(p)))


def preds(learn, files):
    with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl(files, num_workers=0))[0]


def test_model_files_from_a_cuda_learner(classifier, folder, tmp_path):
    """A CUDA learner's model file: load_learner_safe(cpu=False) predicts on the GPU as the learner does, load_model_file
    on the CPU too; in float32 proper to 1e-6 (same device: the batch sizes differ, so cuDNN may pick other kernels) and
    1e-5 (the CPU), and with PyTorch's default TF32 convolutions to 5e-3 on the probabilities"""
    learn, _ = classifier('fp32')
    fn = learn.export_safe(tmp_path/'model.safetensors')
    files = get_image_files(folder)[::3]
    gpu, cpu = load_learner_safe(fn, cpu=False), load_model_file(fn)
    assert next(gpu.model.parameters()).device.type == DEV.type and gpu.dls.device.type == DEV.type
    assert next(cpu.model.parameters()).device.type == 'cpu'
    with tf32(False, False):
        want = preds(learn, files)
        torch.testing.assert_close(preds(gpu, files), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(preds(cpu, files), want, rtol=0, atol=1e-5)
        with learn.no_bar(), cpu.no_bar():
            (label, _, probs), (cpu_label, _, cpu_probs) = learn.predict(files[0]), cpu.predict(files[0])
        assert label == cpu_label and label in ('a', 'b', 'c')
        torch.testing.assert_close(probs.cpu(), cpu_probs, rtol=0, atol=1e-5)
    with tf32(True, False): torch.testing.assert_close(preds(cpu, files), preds(learn, files), rtol=0, atol=5e-3)
    assert next(learn.model.parameters()).device.type == DEV.type


def test_export_onnx_from_a_cuda_learner(classifier, tmp_path, no_tf32):
    "export_onnx of a learner on the GPU: the learner stays there, and ONNX Runtime (CPU) gives its float32 logits to 1e-4, export_onnx's own check"
    import onnxruntime as ort
    learn, _ = classifier('fp32')
    fn = export_onnx(learn, tmp_path/'model.onnx')
    assert next(learn.model.parameters()).device.type == DEV.type
    sess = ort.InferenceSession(str(fn), providers=['CPUExecutionProvider'])
    norm = json.loads(sess.get_modelmeta().custom_metadata_map['input_norm'])
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): y = NormalizedGray(learn.model, norm).to(DEV).eval()(x.to(DEV)).cpu()
    yo = torch.from_numpy(sess.run(None, {'image': x.numpy()})[0])
    assert rel_error(yo, y) <= 1e-4


def test_gray_callback_on_cuda_batches(folder, tmp_path):
    "RGB DataLoaders on the GPU: GrayCallback turns their batches into the gray pipeline's there, and Lite0 trains on them"
    gray = class_dls(folder)
    gray.add_tfms([Normalize.from_stats([.5], [.5])], 'after_batch')   # as gray_learner normalizes gray input for Lite0
    want = gray.valid.one_batch()[0]
    dls3 = class_dls(folder, ImageBlock, batch_tfms=Normalize.from_stats(*imagenet_stats))
    set_seed(0)
    learn = gray_learner(dls3, LITE0, path=tmp_path)
    cb, = learn.cbs.filter(lambda c: isinstance(c, GrayCallback))
    learn.xb, learn.dl = (dls3.valid.one_batch()[0],), dls3.valid
    assert learn.xb[0].device.type == DEV.type and learn.xb[0].shape[1] == 3
    cb.before_batch()
    x = learn.xb[0]
    assert x.device.type == DEV.type and x.shape[1] == 1
    assert (x - want).abs().max() * 0.5 <= 1/255 + 1e-6   # gray std 0.5 for Lite0: within one 8-bit level
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert finite(learn) and next(learn.model.parameters()).device.type == DEV.type


def test_heatmaps_from_a_cuda_learner(classifier, folder):
    "heatmaps on the GPU (issue 20): a map in [0, 1] at each image's own size, the learner left on the GPU in the mode it had"
    learn, _ = classifier('fp32')
    files, training = get_image_files(folder)[:4], learn.model.training
    hm = heatmaps(learn, files)
    assert [m.shape for m in hm] == [(64, 64)] * 4 and all(0 <= m.min() and m.max() <= 1 for m in hm)
    assert next(learn.model.parameters()).device.type == DEV.type and learn.model.training == training


def test_cache_dataloaders_on_cuda(folder, tmp_path):
    """A gray cache's batches go to the GPU as stored (8-bit integers) and become float there, equal to the CPU's batches;
    a bf16 classifier trains from them (issue 19: the cache's DataLoader on CUDA)"""
    cache = build_gray_cache(folder, tmp_path/'cache', 64, n_workers=0, progress=False)
    cuda, cpu = cache.dataloaders(bs=8, device=DEV), cache.dataloaders(bs=8, device='cpu')
    raw, _ = cuda.train._batch(cuda.train.rows[:4])
    assert raw.device.type == DEV.type and raw.dtype == torch.uint8
    (x, y), (cx, cy) = cuda.valid.one_batch(), cpu.valid.one_batch()
    assert x.device.type == DEV.type and x.dtype == torch.float32
    assert torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)
    set_seed(0)
    learn = gray_learner(cuda, LITE0, metrics=accuracy, path=tmp_path).to_bf16()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 3e-3)
    assert finite(learn) and next(learn.model.parameters()).device.type == DEV.type


def test_channels_last_training(folder, tmp_path):
    "to_channelslast (with fp16 AMP): the model in channels_last, the fused stem's output too, finite losses"
    set_seed(0)
    learn = gray_learner(class_dls(folder), LITE0, metrics=accuracy, path=tmp_path).to_channelslast()
    record = stem_record(learn)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert finite(learn)
    assert record and all(r == (torch.float16, True, False) for r in record), record[:3]
    wide = [m.weight for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 4]
    assert wide and all(w.is_contiguous(memory_format=torch.channels_last) for w in wide)


# ---------------------------------------------------------------------------------------------------- a U-Net

@pytest.fixture(scope='module')
def seg_dls(tmp_path_factory):
    "64 digit images of 48 px and their masks, on the GPU"
    import pandas as pd
    images, masks, codes, valid = segmentation_items(digits_segmentation_dataset(tmp_path_factory.mktemp('seg')/'digits', n=64, size=48))
    return DataBlock(blocks=(GrayImageBlock, GrayMaskBlock(codes)), get_x=ColReader('image'), get_y=ColReader('mask'),
                     splitter=IndexSplitter(valid)).dataloaders(pd.DataFrame(dict(image=images, mask=masks)), bs=8, num_workers=0,
                                                                device=DEV)


@pytest.fixture(scope='module')
def unet(seg_dls, tmp_path_factory):
    "A Lite0 U-Net on the digits, by precision (`trained`): Dice 0.88 in float32 on the CPU"
    return trained(lambda p: gray_unet_learner(seg_dls, LITE0, metrics=Dice(), path=tmp_path_factory.mktemp(f'unet_{p}')))


@pytest.mark.parametrize('task, margin, floor', [('classifier', ACCURACY_MARGIN, 0.75), ('unet', DICE_MARGIN, 0.5)])
@pytest.mark.parametrize('precision, dtype', [('fp16', torch.float16), ('bf16', torch.bfloat16)])
def test_mixed_precision(request, task, margin, floor, precision, dtype):
    """to_fp16/to_bf16 of a classifier (accuracy) and a U-Net (Dice): finite losses, the fused stem computing in half
    precision with float32 weights, the metric within `margin` of fp32's, and the fp32 run above `floor` (it learned)"""
    runs = request.getfixturevalue(task)
    (ref, ref_record), (learn, record) = runs('fp32'), runs(precision)
    assert finite(ref) and finite(learn)
    assert record and all(r == (dtype, r[1], False) for r in record), record[:3]   # fused: the offset conv never ran
    assert ref_record and all(r[0] == torch.float32 for r in ref_record)
    assert find_first_conv(learn.model)[1].conv.weight.dtype == torch.float32      # AMP keeps float32 master weights
    metric, ref_metric = learn.recorder.values[-1][2], ref.recorder.values[-1][2]
    assert metric >= ref_metric - margin, (task, precision, metric, ref_metric)
    assert ref_metric >= floor, (task, ref_metric)


# ---------------------------------------------------------------------------------------------------- exactness and the stem

@pytest.fixture(scope='module')
def lite0_pair():
    "The ImageNet Lite0 on the GPU, 3-channel and converted as if trained on ImageNet-normalized input (so the border term matters)"
    m3 = timm.create_model(LITE0, pretrained=True, pretrained_cfg_overlay=dict(file=str(lite0_checkpoint()))).eval()
    m1 = update_first_layer(copy.deepcopy(m3), stats=imagenet_stats).eval()
    g = torch.rand(2, 1, 97, 131, generator=torch.Generator().manual_seed(0))
    x3, x1 = rgb_and_gray(g, imagenet_stats)
    return m3.to(DEV), m1.to(DEV), x3.to(DEV), x1.to(DEV)


@pytest.mark.parametrize('fused', [None, False])
def test_exact_on_cuda_without_tf32(lite0_pair, no_tf32, fused):
    "float32 proper on the GPU: the gray Lite0's logits are the 3-channel one's to 1e-5, fused (the default on CUDA) or not"
    m3, m1, x3, x1 = lite0_pair
    stem = find_first_conv(m1)[1]
    stem.fused = fused
    try:
        with torch.no_grad(): assert rel_error(m1(x1), m3(x3)) <= 1e-5
    finally: stem.fused = None


def test_exact_on_cuda_with_default_tf32(lite0_pair, default_tf32):
    """PyTorch's default (TF32 convolutions): within 2e-3, TF32's rounding (10-bit mantissa, 2^-11 = 4.9e-4 an input; 5.5e-4
    measured on the H200), not the conversion's; fp16 autocast within 1e-2 (2.6e-3 measured there)"""
    m3, m1, x3, x1 = lite0_pair
    with torch.no_grad():
        ref = m3(x3)
        assert rel_error(m1(x1), ref) <= 2e-3
        with torch.autocast('cuda', dtype=torch.float16): y = m1(x1)
    assert y.dtype == torch.float16 and rel_error(y.float(), ref) <= 1e-2


@pytest.mark.parametrize('arch', ['resnet18', LITE0])
def test_fused_stem_on_cuda(arch, no_tf32):
    "The default on CUDA is the fused conv: outputs (1e-6) and gradients (1e-5) of the two-term form, channels_last, bf16 autocast"
    torch.manual_seed(0)
    conv = find_first_conv(timm.create_model(arch, pretrained=False))[1]
    two, one = ExactGrayConv(conv, fused=False).to(DEV), ExactGrayConv(conv).to(DEV)
    offset_calls = []
    one.offset.register_forward_hook(lambda m, i, o: offset_calls.append(1))
    x = torch.randn(4, 1, 97, 131, device=DEV)
    y2, y1 = two(x), one(x)
    assert not offset_calls and rel_error(y1, y2) <= 1e-6
    gy = torch.randn_like(y2)
    y2.backward(gy); y1.backward(gy)
    for p2, p1 in zip(two.parameters(), one.parameters()): assert rel_error(p1.grad, p2.grad) <= 1e-5
    cl = copy.deepcopy(one).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = cl(x.to(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last) and rel_error(y, y2) <= 1e-6
        with torch.autocast('cuda', dtype=torch.bfloat16): yb = one(x)
    assert yb.dtype == torch.bfloat16 and rel_error(yb.float(), y2) <= 1e-2
