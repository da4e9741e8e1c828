"`fastai-gray`: train -> export -> predict on tiny folders and a CSV, and every bad input as one line on stderr."
import subprocess, sys, types
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
import fastai_gray.cli
from fastai_gray.cli import main
from conftest import class_image, write_labelled_images  # the image writers the test files share

TINY = ['--epochs', '1', '--size', '32', '--bs', '8']  # Lite0 with its real (packaged) weights, tiny images


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    flat = write_labelled_images(root/'flat')
    assert Image.open(flat/'a'/'a1.png').mode == 'I;16' and Image.open(flat/'a'/'a2.png').mode == 'RGBA'
    write_labelled_images(root/'split'/'train', n=6); write_labelled_images(root/'split'/'valid', n=2)
    rows = [f'flat/{c}/{c}{i}.png,{c}' for c in 'abc' for i in range(8)]
    (root/'labels.csv').write_text('filename,label\n' + '\n'.join(rows) + '\n')
    (root/'one').mkdir(); write_labelled_images(root/'one', classes=('a',), n=3)
    (root/'empty').mkdir(); (root/'empty'/'x').mkdir(); (root/'empty'/'x'/'notes.txt').write_text('no images here')
    (root/'loose').mkdir(); class_image('a', 0, 'L').save(root/'loose'/'x.png')
    (root/'broken').mkdir(); write_labelled_images(root/'broken', n=3); (root/'broken'/'b'/'bad.png').write_bytes(b'not a png')
    (root/'missing.csv').write_text('flat/a/a0.png,a\nflat/a/nope.png,b\n')
    (root/'notes.png').write_text('not an image')
    torch.save({'w': torch.zeros(2)}, root/'state.pth')
    return root


@pytest.fixture(autouse=True)
def in_a_scratch_folder(tmp_path, monkeypatch):
    "Each test runs in its own folder: the default --out (model.safetensors) of one, or of a user's run in the clone, is not another's"
    monkeypatch.chdir(tmp_path)


def run(capsys, *argv):
    "`(status, stdout, stderr)` of `main(argv)` in this process"
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _lines(s): return [l for l in s.replace('\r', '\n').splitlines() if l.strip()]


@pytest.mark.slow
def test_train_export_predict(data, capsys, tmp_path):
    model = tmp_path/'gray.safetensors'
    status, out, err = run(capsys, 'train', data/'flat', *TINY, '--out', model)
    assert status == 0, err
    epochs = [l for l in _lines(out) if ' epoch ' in l]     # not a terminal: one line per epoch, no progress bars
    assert len(epochs) == 1 and epochs[0].startswith('model epoch 1/1: train_loss ') and 'accuracy' in epochs[0], out
    assert '\r' not in out and '\x1b' not in out
    assert '18 training and 6 validation images, 3 classes' in out   # stratified: 2 of 8 per class
    assert _lines(out)[-1].startswith('validation accuracy: ') and '/6 images)' in _lines(out)[-1]
    assert model.is_file() and not list(tmp_path.glob('.*.tmp'))

    images = [data/'flat'/'a'/'a1.png', data/'notes.png', data/'flat'/'b'/'b2.png', data/'nope.png', data/'flat'/'c'/'c3.png']
    status, out, err = run(capsys, 'predict', model, *images)
    assert status == 1                                     # two files failed
    rows = [l.split('\t') for l in out.splitlines()]
    assert [r[0] for r in rows] == [str(images[i]) for i in (0, 2, 4)]  # in order, stdout holds results only
    for path, label, prob in rows:
        assert label in ('a', 'b', 'c') and 0 < float(prob) <= 1
    errors = [l for l in err.splitlines() if l.startswith('fastai-gray: error:')]
    assert len(errors) == 2 and 'notes.png' in errors[0] and 'nope.png' in errors[1]
    assert 'Traceback' not in err

    status, out, err = run(capsys, 'predict', model, images[0])
    assert status == 0 and len(out.splitlines()) == 1
    res = subprocess.run([sys.executable, '-m', 'fastai_gray', 'predict', str(model), str(images[0])],  # a fresh process,
                         capture_output=True, text=True, timeout=300)                                     # as from a shell
    assert res.returncode == 0 and res.stdout == out, res.stderr


@pytest.mark.slow
def test_train_csv_and_fastai_arch(data, capsys, tmp_path):
    "A CSV of filename,label; a fastai arch by name, from random weights"
    status, out, err = run(capsys, 'train', data/'labels.csv', *TINY, '--arch', 'resnet18', '--no-pretrained',
                           '--init', 'sum', '--freeze-epochs', '1', '--out', tmp_path/'m.pkl')
    assert status == 0, err
    assert '18 training and 6 validation images, 3 classes' in out
    assert out.count('train_loss') == 2                    # a line for the head alone, one for the whole model
    assert (tmp_path/'m.pkl').is_file() and 'a pickle: load it only with --trust-pickle' in out
    image = data/'flat'/'a'/'a1.png'
    status, out, err = run(capsys, 'predict', tmp_path/'m.pkl', image)   # a pickle is refused ...
    assert status == 1 and out == '' and 'is not a safetensors model file; it was not loaded' in err and '--trust-pickle' in err
    with pytest.warns(UserWarning, match='insecure pickle'):                # ... unless trusted, with fastai's warning
        status, out, err = run(capsys, 'predict', tmp_path/'m.pkl', image, '--trust-pickle')
    assert status == 0 and out.startswith(str(image))


@pytest.mark.slow
def test_train_valid_layout(data, capsys, tmp_path, monkeypatch):
    "train/ and valid/ folders; the model goes to model.safetensors in the current folder by default"
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, 'train', data/'split', *TINY)
    assert status == 0, err
    assert '18 training and 6 validation images, 3 classes' in out   # the folders' split, not 20%
    assert f"exported the learner to {tmp_path/'model.safetensors'}" in out and (tmp_path/'model.safetensors').is_file()
    status, out, err = run(capsys, 'predict', 'model.safetensors', data/'split'/'valid'/'b'/'b1.png')
    assert status == 0 and out.split('\t')[1] in ('a', 'b', 'c')


@pytest.mark.parametrize('argv, message', [
    (['train', '{root}/nope'], 'does not exist'),
    (['train', '{root}/empty'], 'no images found'),
    (['train', '{root}/loose'], '1 image(s) lie directly in it'),
    (['train', '{root}/one'], 'one class only'),
    (['train', '{root}/missing.csv'], "'flat/a/nope.png' (line 2)"),
    (['train', '{root}/notes.png'], 'not a CSV'),
    (['train', '{root}/flat', '--arch', 'resnet19'], "unknown arch 'resnet19'"),
    (['train', '{root}/flat', '--arch', 'timm:not_a_model'], 'unknown timm model'),
    (['train', '{root}/flat', '--init', 'avg'], "invalid choice: 'avg'"),
    (['train', '{root}/flat', '--epochs', '0'], '--epochs must be at least 1'),
    (['train', '{root}/flat', '--freeze-epochs', '-1'], '--freeze-epochs must be 0 or more'),
    (['train', '{root}/flat', '--lr', 'fast'], "invalid float value: 'fast'"),
    (['train', '{root}/flat', '--out', '{root}'], 'is a folder'),
    (['train', '{root}/flat', '--window', '2048'], '--window takes CENTER WIDTH (numbers, WIDTH > 0), minmax, dicom'),
    (['train', '{root}/flat', '--window', '100', '0'], '--window takes CENTER WIDTH'),
    (['train', '{root}/flat', '--window', 'max'], '--window takes CENTER WIDTH'),
    (['train', '--window', 'lungs', '{root}/nope'], 'nope does not exist'),           # the PATH after a window word ...
    (['train', '--window', '40', '80', '{root}/nope'], 'nope does not exist'),        # ... or after CENTER WIDTH
    (['train', '{root}/flat', '--map', '255'], '--map takes VALUE:LABEL pairs'),
    (['predict', '{root}/labels.csv', '{root}/flat/a/a0.png'], 'is not a safetensors model file; it was not loaded'),
    (['predict', '{root}/state.pth', '{root}/flat/a/a0.png'], 'is not a safetensors model file; it was not loaded'),
    (['predict', '{root}/labels.csv', '{root}/flat/a/a0.png', '--trust-pickle'], 'is not a learner exported by `learn.export`'),
    (['export', '{root}/state.pth', '--onnx', '{root}/m.onnx'], 'is not a safetensors model file; it was not loaded'),
    (['export', '{root}/none.safetensors'], 'the following arguments are required: --onnx'),
    (['predict', '{root}/none.pkl', '{root}/flat/a/a0.png'], 'does not exist'),
    (['predict', '{root}/none.pkl'], 'the following arguments are required: IMAGE'),
    (['predict', '{root}/none.pkl', '{root}/flat/a/a0.png', '--bs', '0'], 'argument --bs: must be a positive integer, got 0'),
    (['train', '{root}/flat', '--bs', '0'], '--bs must be at least 1'),
    (['train', '{root}/flat', '--valid-pct', '1'], '--valid-pct must lie between 0 and 1'),
    (['frobnicate'], "invalid choice: 'frobnicate'"),
], ids=lambda v: ' '.join(v).replace('{root}/', '') if isinstance(v, list) else None)
def test_bad_input(data, capsys, argv, message):
    status, out, err = run(capsys, *[a.format(root=data) for a in argv])
    assert status != 0
    assert 'Traceback' not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('fastai-gray: error: ') and message in lines[0], err
    assert 'epoch' not in out                              # caught before any training


def test_bad_files_are_listed(data, capsys):
    "Every unreadable file on its own line, then one error; nothing trained"
    (data/'broken'/'a'/'empty.png').write_bytes(b'')
    try: status, out, err = run(capsys, 'train', data/'broken', *TINY)
    finally: (data/'broken'/'a'/'empty.png').unlink()
    assert status == 1 and 'epoch' not in out and 'Traceback' not in err
    lines = err.splitlines()
    assert [l.split(': ')[1] for l in lines] == ['bad image', 'bad image', 'error'], err
    assert "empty.png': PIL recognizes no image format in it; the file is empty (0 bytes)" in lines[0]
    assert "bad.png': PIL recognizes no image format in it; as a PNG file: not a PNG file" in lines[1]
    assert lines[2].startswith('fastai-gray: error: 2 of 11 image files cannot be read (listed above)') and '--skip-bad' in lines[2]


@pytest.mark.slow
def test_skip_bad_and_window(data, capsys, tmp_path):
    "--skip-bad trains on the readable files; --window goes into the exported learner's pipeline"
    model = tmp_path/'m.safetensors'
    status, out, err = run(capsys, 'train', data/'broken', *TINY, '--bs', '3', '--skip-bad', '--window', 'minmax', '--out', model)
    assert status == 0, err
    assert "fastai-gray: warning: skipping: cannot read image '" in err and 'bad.png' in err
    assert 'fastai-gray: warning: 1 of 10 image files cannot be read; left out (skip_bad)' in err
    assert '6 training and 3 validation images, 3 classes' in out and 'window minmax' in out
    from fastai_gray.safe import load_learner_safe
    dark = data/'broken'/'a'/'a0.png'                      # values 0..59 of 255
    image, = load_learner_safe(model).dls.test_dl([dark]).dataset[0]
    assert np.asarray(image).min() == 0 and np.asarray(image).max() == 255   # spread over the whole range
    status, out, err = run(capsys, 'predict', model, data/'broken'/'a'/'a0.png')
    assert status == 0 and out.startswith(str(data/'broken'/'a'/'a0.png'))


class _Evil:
    "A pickle that would leave a marker file behind if it ran"
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize('name', ['evil.pkl', 'evil.safetensors', 'evil'])
def test_hostile_pickle_runs_nothing(data, capsys, tmp_path, name):
    "A crafted pickle, whatever its name, is refused by predict and export, and its code never runs"
    import pickle
    marker = tmp_path/'pwned'
    (tmp_path/name).write_bytes(pickle.dumps(_Evil(marker)))
    for argv in (['predict', tmp_path/name, data/'flat'/'a'/'a0.png'], ['export', tmp_path/name, '--onnx', tmp_path/'m.onnx']):
        status, out, err = run(capsys, *argv)
        assert status == 1 and 'is not a safetensors model file; it was not loaded' in err and '--trust-pickle' in err
        assert not marker.exists() and not (tmp_path/'m.onnx').exists()


@pytest.mark.slow
def test_export_onnx(data, capsys, tmp_path):
    "fastai-gray export --onnx: ONNX Runtime on a gray image in 0..1 gives the class predict prints"
    ort = pytest.importorskip('onnxruntime')
    model, onnx_file = tmp_path/'m.safetensors', tmp_path/'m.onnx'
    assert run(capsys, 'train', data/'flat', *TINY, '--out', model)[0] == 0
    status, out, err = run(capsys, 'export', model, '--onnx', onnx_file)
    assert status == 0 and onnx_file.is_file() and str(onnx_file) in out, err
    image = data/'flat'/'c'/'c3.png'                       # mode 'RGB' (see _write_classes), read as its luma
    status, out, err = run(capsys, 'predict', model, image)
    label = out.split('\t')[1]
    sess = ort.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    x = np.asarray(Image.open(image).convert('L').resize((32, 32), Image.BILINEAR), np.float32)[None, None] / 255
    vocab = sess.get_modelmeta().custom_metadata_map
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert logits.shape == (1, 3)
    import json
    assert json.loads(vocab['vocab'])[int(logits.argmax())] == label


def test_only_weight_failures_blame_the_weights(data, capsys, monkeypatch):
    "A failure while fetching weights is one line naming the arch; any other error keeps its own type and message"
    import fastai_gray.learner
    def load_pretrained(url): raise OSError('[Errno 101] Network is unreachable')
    def offline_learner(dls, arch, **kwargs): load_pretrained('https://example.invalid/resnet18.pth')
    monkeypatch.setattr(fastai_gray.learner, 'gray_learner', offline_learner)
    status, out, err = run(capsys, 'train', data/'flat', *TINY, '--arch', 'resnet18')
    assert status == 1 and err.startswith('fastai-gray: error: cannot load pretrained weights for resnet18 (OSError: [Errno 101]')
    def broken_learner(dls, arch, **kwargs): raise ValueError('`n_out` is not defined')
    monkeypatch.setattr(fastai_gray.learner, 'gray_learner', broken_learner)
    with pytest.raises(ValueError, match='`n_out` is not defined'): main(['train', str(data/'flat'), *TINY])


def test_bench_is_handed_the_arguments(capsys, monkeypatch):
    calls = []
    fake = types.ModuleType('fastai_gray.bench')
    fake.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, 'fastai_gray.bench', fake)
    assert main(['bench', '--arch', 'x', 'y']) == 3 and calls == [['--arch', 'x', 'y']]
    monkeypatch.setitem(sys.modules, 'fastai_gray.bench', None)  # as if the module were missing
    status, out, err = run(capsys, 'bench')
    assert status == 1 and err.startswith('fastai-gray: error: ') and 'fastai_gray.bench' in err and len(err.splitlines()) == 1
    monkeypatch.delitem(sys.modules, 'fastai_gray.bench')
    monkeypatch.setitem(sys.modules, 'skimage', None)              # as if scikit-image were not installed
    status, out, err = run(capsys, 'bench')
    assert status == 1 and 'pip install "fastai_gray[bench]"' in err and len(err.splitlines()) == 1, err


def test_help(capsys):
    assert run(capsys, '--help')[0] == 0
    status, out, err = run(capsys, 'train', '--help')
    assert status == 0 and '--arch' in out and '--init' in out
    assert run(capsys)[0] == 2  # no command: the usage, and a usage status


@pytest.mark.slow
def test_python_m(data):
    "`python -m fastai_gray`: help at once; an error after fastai and timm are imported is still one line on stderr"
    res = subprocess.run([sys.executable, '-m', 'fastai_gray', '--help'], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert 'train' in res.stdout and 'predict' in res.stdout and 'bench' in res.stdout
    res = subprocess.run([sys.executable, '-m', 'fastai_gray', 'train', str(data/'flat'), '--arch', 'resnet19'],
                         capture_output=True, text=True, timeout=300)
    lines = res.stderr.splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr   # no library warnings, no traceback
    assert lines[0].startswith("fastai-gray: error: unknown arch 'resnet19'") and 'did you mean resnet18' in lines[0]


def _dicom_copies(src:str, dest:Path, n:int, seed:int):
    "`n` copies of pydicom's test file `src` in `dest`, each with noise added to its stored pixels"
    pydicom = pytest.importorskip('pydicom')
    from pydicom.data import get_testdata_file
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file(src))
        a = ds.pixel_array
        a = (a.astype(np.int64) + rng.integers(-20, 21, a.shape)).clip(np.iinfo(a.dtype).min, np.iinfo(a.dtype).max)
        ds.PixelData = a.astype(a.dtype if a.dtype == ds.pixel_array.dtype else ds.pixel_array.dtype).tobytes()
        ds.save_as(dest/f'{src[:2].lower()}{i}.dcm')


@pytest.mark.slow
def test_dicom_folder(tmp_path, capsys):
    "A folder of DICOM files mixed with a PNG: bad DICOM listed, the rest trained on, predict reads a .dcm file"
    _dicom_copies('CT_small.dcm', tmp_path/'data'/'ct', 6, 0)
    _dicom_copies('MR_small.dcm', tmp_path/'data'/'mr', 6, 1)
    class_image('a', 0, 'L').save(tmp_path/'data'/'ct'/'scout.png')
    good = (tmp_path/'data'/'ct'/'ct0.dcm').read_bytes()
    (tmp_path/'data'/'mr'/'cut.dcm').write_bytes(good[:len(good) // 2])       # cut short
    (tmp_path/'data'/'mr'/'notes.dcm').write_text('not a DICOM file')
    status, out, err = run(capsys, 'train', tmp_path/'data', *TINY)
    assert status == 1 and 'epoch' not in out
    bad = [l for l in err.splitlines() if l.startswith('fastai-gray: bad image: ')]
    assert len(bad) == 2 and 'cut.dcm' in bad[0] and 'notes.dcm' in bad[1], err
    model = tmp_path/'m.safetensors'
    status, out, err = run(capsys, 'train', tmp_path/'data', *TINY, '--skip-bad', '--out', model)
    assert status == 0, err
    assert '11 training and 2 validation images, 2 classes' in out
    status, out, err = run(capsys, 'predict', model, tmp_path/'data'/'mr'/'mr1.dcm', tmp_path/'data'/'mr'/'notes.dcm')
    rows = [l.split('\t') for l in out.splitlines()]
    assert status == 1 and len(rows) == 1 and rows[0][0].endswith('mr1.dcm') and rows[0][1] in ('ct', 'mr')
    assert 'notes.dcm' in err
    status, out, err = run(capsys, 'train', *TINY, '--skip-bad', '--out', model, '--overwrite', '--window', 'lungs', tmp_path/'data')  # PATH after a window
    assert status == 0, err
    assert "skipping: " in err and 'scout.png' in err and 'window lungs' in out   # a CT preset does not apply to a PNG
    assert err.count('is a CT preset in Hounsfield units') == 1 and "but 6 of the 12 DICOM files are not CT (Modality: 6 MR)" in err  # said once, for all


@pytest.mark.slow
def test_segment_train_predict(tmp_path, capsys):
    "--task segment on an images/ + masks/ folder; predict writes a mask of each image's size; bad masks stop training first"
    from fastai_gray.datasets import digits_segmentation_dataset
    data = digits_segmentation_dataset(tmp_path/'seg', n=24)
    model = tmp_path/'seg.safetensors'
    status, out, err = run(capsys, 'train', data, '--task', 'segment', '--epochs', '1', '--size', '48', '--bs', '8', '--out', model)
    assert status == 0, err
    assert '19 training and 5 validation images, 2 codes (background, digit)' in out and 'dice' in out
    assert _lines(out)[-1].startswith('validation dice: ')
    class_image('a', 0, 'L').resize((37, 29)).save(tmp_path/'odd.png')   # any size: the mask comes back at the image's size
    status, out, err = run(capsys, 'predict', model, data/'images'/'0001.png', tmp_path/'odd.png', tmp_path/'nope.png',
                           '--out-dir', tmp_path/'masks')
    assert status == 1 and 'nope.png' in err
    rows = [l.split('\t') for l in out.splitlines()]
    assert [r[1] for r in rows] == [str(tmp_path/'masks'/'0001.png'), str(tmp_path/'masks'/'odd.png')]
    assert all(r[2].startswith('background ') and ', digit ' in r[2] for r in rows)
    assert Image.open(tmp_path/'masks'/'odd.png').size == (37, 29) and Image.open(tmp_path/'masks'/'0001.png').size == (48, 48)
    assert set(np.unique(np.asarray(Image.open(tmp_path/'masks'/'odd.png')))) <= {0, 1}
    status, out, err = run(capsys, 'predict', model, tmp_path/'odd.png')
    assert status == 2 and 'give --out-dir DIR' in err
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(data/'masks'/'0003.png')
    status, out, err = run(capsys, 'train', data, '--task', 'segment', *TINY)
    assert status == 1 and 'epoch' not in out and "0003.png' holds label value(s) 255 outside range(2)" in err
    status, out, err = run(capsys, 'train', '--task', 'segment', '--map', '255:1', *TINY, '--out', tmp_path/'m2.safetensors', data)
    assert status == 0, err
    status, out, err = run(capsys, 'train', data, '--map', '255:1', *TINY)
    assert status == 2 and '--map is for --task segment' in err


# ---------------------------------------------------------------------------------------------------- everyday use (issue 17)

@pytest.fixture(scope='module')
def tiny_model(data, tmp_path_factory):
    "A classifier of `data/'flat'` (a, b, c), trained for one epoch at 16 px"
    model = tmp_path_factory.mktemp('tiny')/'tiny.safetensors'
    assert main(['train', str(data/'flat'), '--epochs', '1', '--size', '16', '--bs', '8', '--out', str(model)]) == 0
    return model


@pytest.mark.slow
def test_small_data_and_size_from_the_images(tmp_path, capsys):
    "Fewer training images than --bs: bs lowered with a notice, a finite loss; no --size: the images' size, said in the start line"
    write_labelled_images(tmp_path/'few', classes=('a', 'b'), n=6, size=(20, 30))
    status, out, err = run(capsys, 'train', tmp_path/'few', '--epochs', '1', '--out', tmp_path/'m.safetensors')
    assert status == 0, err
    assert 'fastai-gray: warning: bs 32 is more than the 10 training images: lowered to 10' in err
    assert "at 32 px (the images' median shorter side is 20 px), bs 10," in out
    loss = float(out.split('train_loss ')[1].split(',')[0])
    assert np.isfinite(loss) and (tmp_path/'m.safetensors').is_file()


@pytest.mark.slow
def test_small_segmentation_data(tmp_path, capsys):
    "Segmentation with fewer training images than --bs trains (it raised `This DataLoader does not contain any batches`)"
    from fastai_gray.datasets import digits_segmentation_dataset
    data = digits_segmentation_dataset(tmp_path/'seg', n=10, size=32)
    status, out, err = run(capsys, 'train', data, '--task', 'segment', '--epochs', '1', '--out', tmp_path/'m.safetensors')
    assert status == 0, err
    assert 'lowered to 8' in err and '8 training and 2 validation images' in out and 'at 32 px' in out


@pytest.mark.slow
def test_a_diverging_run_keeps_no_model(data, capsys, tmp_path):
    "A loss that is not finite: one error, exit status 1, no model file"
    model = tmp_path/'m.safetensors'
    status, out, err = run(capsys, 'train', data/'flat', '--epochs', '2', '--size', '16', '--bs', '8', '--lr', '1e12', '--out', model)
    assert status == 1 and 'Traceback' not in err and not model.exists() and not list(tmp_path.iterdir())
    assert _lines(err)[-1].startswith('fastai-gray: error: the ') and 'the model diverged, so none is kept; try a lower lr' in err


@pytest.mark.slow
def test_no_overwrite_without_the_flag(data, capsys, tmp_path, tiny_model):
    "train refuses an existing --out before training, predict refuses existing masks before predicting; --overwrite replaces"
    model = tmp_path/'m.safetensors'
    model.write_bytes(b'a good model')
    status, out, err = run(capsys, 'train', data/'flat', *TINY, '--out', model)
    assert status == 1 and 'epoch' not in out and model.read_bytes() == b'a good model'
    assert _lines(err) == [f'fastai-gray: error: --out {model} exists; give --overwrite to replace it']
    status, out, err = run(capsys, 'train', data/'flat', *TINY, '--out', model, '--overwrite')
    assert status == 0 and model.read_bytes() != b'a good model' and [p.name for p in tmp_path.iterdir()] == ['m.safetensors']
    from fastai_gray.datasets import digits_segmentation_dataset
    seg = digits_segmentation_dataset(tmp_path/'seg', n=12, size=32)
    unet = tmp_path/'unet.safetensors'
    assert run(capsys, 'train', seg, '--task', 'segment', '--epochs', '1', '--bs', '4', '--out', unet)[0] == 0
    masks, images = tmp_path/'masks', [seg/'images'/'0000.png', seg/'images'/'0001.png']
    masks.mkdir(); (masks/'0001.png').write_bytes(b'kept')
    status, out, err = run(capsys, 'predict', unet, *images, '--out-dir', masks)
    assert status == 1 and out == '' and (masks/'0001.png').read_bytes() == b'kept' and not (masks/'0000.png').exists()
    assert _lines(err) == [f"fastai-gray: error: mask file {masks/'0001.png'} (of {images[1]}) exists; give --overwrite to replace it"]
    status, out, err = run(capsys, 'predict', unet, *images, '--out-dir', masks, '--overwrite')
    assert status == 0 and len(out.splitlines()) == 2 and Image.open(masks/'0001.png').size == (32, 32)


def _predict(model, *args, stdin=None, bufsize=-1):
    return subprocess.Popen([sys.executable, '-m', 'fastai_gray', 'predict', str(model), *map(str, args)], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=bufsize)


@pytest.mark.slow
def test_folders_lists_stdin_and_pipes(data, capsys, tmp_path, tiny_model):
    "predict DIR, @LIST and - (stdin), in input order; lines come as they are made; a reader that stops early is no error"
    flat = sorted(str(p) for p in (data/'flat').rglob('*.png'))
    status, out, err = run(capsys, 'predict', tiny_model, data/'flat', '--bs', '5')
    assert status == 0 and [l.split('\t')[0] for l in out.splitlines()] == flat, err
    (tmp_path/'list.txt').write_text('\n'.join(flat[::-1]) + '\n')
    status, out2, err = run(capsys, 'predict', tiny_model, f"@{tmp_path/'list.txt'}", '--bs', '5')
    assert status == 0 and out2.splitlines() == out.splitlines()[::-1]
    status, out, err = run(capsys, 'predict', tiny_model, f"@{tmp_path/'nope.txt'}")
    assert status == 1 and 'nope.txt' in err and 'does not exist' in err
    # a fresh process, as from a shell: names on stdin, each line out as soon as its batch is done (stdin still open)
    p = _predict(tiny_model, '-', '--bs', '1', stdin=subprocess.PIPE, bufsize=1)
    p.stdin.write(flat[0] + '\n'); p.stdin.flush()
    assert p.stdout.readline().split('\t')[0] == flat[0]                     # streamed: the first line before the list ends
    p.stdin.write(flat[1] + '\n'); p.stdin.close()
    assert p.stdout.readline().split('\t')[0] == flat[1] and p.wait(timeout=60) == 0
    # `| head -1`: the reader goes away after one line
    p = _predict(tiny_model, data/'flat', data/'flat', data/'flat', '--bs', '1')
    assert p.stdout.readline().startswith(flat[0]); p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and 'Traceback' not in err and 'BrokenPipe' not in err, err


def test_the_demo_says_where_its_data_is(capsys, monkeypatch, tmp_path):
    "The start line names the folder the digits demo was written to (training left out)"
    import fastai_gray.train
    from fastai_gray.weights import cache_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fastai_gray.train, '_fit', lambda *args: None)
    monkeypatch.setattr(fastai_gray.cli, 'export_model', lambda learn, out, overwrite: out)
    monkeypatch.setattr(fastai_gray.cli, '_final_metric', lambda learn: '')
    status, out, err = run(capsys, 'train', '--epochs', '1', '--out', 'unused.safetensors')
    assert status == 0, err
    assert out.startswith(f"digits ({cache_dir()/'digits'}): 1438 training and 359 validation images, 10 classes")


def test_default_model_file_is_git_ignored():
    root = Path(__file__).parents[1]
    if not (root/'.git').exists(): pytest.skip('not a git checkout')
    assert subprocess.run(['git', 'check-ignore', '-q', 'model.safetensors'], cwd=root).returncode == 0
