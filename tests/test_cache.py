"""The gray cache: pictures equal to the file pipeline's (8-bit, 16-bit, DICOM through a window, masks), a killed build
that never opens, settings checked, unreadable files, training and predicting from files, memory, each rank its share."""
import json, os, signal, subprocess, sys, textwrap, time, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from fastai.vision.augment import Resize
from fastai_gray.cache import build_gray_cache, GrayCache, GrayCacheDL
from fastai_gray.datasets import UnreadableImagesError, DatasetWarning, digits_segmentation_dataset
from fastai_gray.train import _classify_data, _segment_data

torch.set_num_threads(1)

def _folder(root:Path, n:int=24, bits:int=8, seed:int=0) -> Path:
    "`n` images of random sizes in two class folders under `root`: 8-bit gray, RGB every third, or 16-bit"
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(12, 40, 2)
        if bits == 16: im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        elif i % 3 == 0: im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        else: im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        (root/f'c{i % 2}').mkdir(parents=True, exist_ok=True)
        im.save(root/f'c{i % 2}'/f'{i:03d}.png')
    return root

def _dicom_folder(root:Path) -> Path:
    "The CT slices bundled with pydicom, three times over, in two class folders"
    pytest.importorskip('pydicom')
    from pydicom.data import get_testdata_file
    for i, p in enumerate(sorted(Path(get_testdata_file('DICOMDIR')).parent.glob('77654033/CT2/*')) * 3):
        (root/f'c{i % 2}').mkdir(parents=True, exist_ok=True)
        (root/f'c{i % 2}'/f'{i}.dcm').write_bytes(p.read_bytes())
    return root

def _file_dls(src, size, method='squish', task='classify', window=None, mapping=None, seed=42):
    "The file DataLoaders `train_gray` makes for `src` (its data functions, its item Resize), on the CPU"
    data = _classify_data if task == 'classify' else _segment_data
    dblock, items, codes = data(Path(src), 0.2, seed, False, window, mapping)
    dblock.item_tfms = [*dblock.item_tfms, Resize(size, method=method)]
    return dblock.dataloaders(items, bs=8, num_workers=0, device='cpu')

def _all(dl):
    "Every batch of `dl` in order, concatenated: `(x, y)` as plain tensors"
    xs, ys = zip(*[(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)) for x, y in dl])
    return torch.cat(xs), torch.cat(ys)

def _same_as_files(cache, files_dls, exact:bool):
    "The cache's validation batches are the file pipeline's, within 1 gray level (`exact`: equal)"
    dls = cache.dataloaders(bs=8, device='cpu')
    assert len(dls.valid_ds) == len(files_dls.valid_ds) and len(dls.train_ds) == len(files_dls.train_ds)
    (x, y), (fx, fy) = _all(dls.valid), _all(files_dls.valid)
    assert x.shape == fx.shape and x.dtype == fx.dtype == torch.float32
    assert torch.equal(y.long(), fy.long())
    if exact: assert torch.equal(x, fx)
    else: assert (x - fx).abs().max() <= 1 / 255
    return x, fx

@pytest.mark.parametrize('method', ['squish', 'crop', 'pad'])
def test_8bit_pictures_are_the_file_pipelines(tmp_path, method):
    src = _folder(tmp_path/'src')
    cache = build_gray_cache(src, tmp_path/'cache', 20, method=method, n_workers=2, progress=False)
    assert cache.images.dtype == np.uint8 and cache.images.shape == (24, 20, 20)
    _same_as_files(cache, _file_dls(src, 20, method), exact=True)

def test_16bit_pictures_within_a_gray_level(tmp_path):
    src = _folder(tmp_path/'src', bits=16)
    cache = build_gray_cache(src, tmp_path/'cache', 16, n_workers=0, progress=False)
    assert cache.images.dtype == np.uint16
    x, fx = _same_as_files(cache, _file_dls(src, 16), exact=False)
    assert (x - fx).abs().max() <= 1 / 65535 and len(torch.unique(x)) > 256  # 16-bit precision kept

def test_dicom_through_a_window(tmp_path):
    src = _dicom_folder(tmp_path/'src')
    cache = build_gray_cache(src, tmp_path/'cache', 32, window=(40, 400), n_workers=2, progress=False)
    assert cache.images.dtype == np.uint16 and cache.settings['window'] == [40, 400]
    _same_as_files(cache, _file_dls(src, 32, window=(40, 400)), exact=False)

def test_ct_preset_on_other_modalities_warns_as_in_training(tmp_path):
    "The data layer's check, which `train_gray` also meets: a CT preset on MR files warns once, naming the modality"
    src = _dicom_folder(tmp_path/'src')
    from pydicom.data import get_testdata_file
    (src/'c0'/'mr.dcm').write_bytes(Path(get_testdata_file('MR_small.dcm')).read_bytes())
    with pytest.warns(DatasetWarning) as record: build_gray_cache(src, tmp_path/'cache', 16, window='lungs', n_workers=0, progress=False)
    ct = [w for w in record if 'CT preset' in str(w.message)]
    assert len(ct) == 1 and 'Modality: 1 MR' in str(ct[0].message)

def test_masks_nearest_and_checked(tmp_path):
    src = digits_segmentation_dataset(tmp_path/'seg', n=20, size=40)
    cache = build_gray_cache(src, tmp_path/'cache', 24, task='segment', n_workers=2, progress=False)
    assert cache.codes == ['background', 'digit'] and cache.vocab == cache.codes and cache.masks.dtype == np.uint8
    files = _file_dls(src, 24, task='segment')
    _same_as_files(cache, files, exact=True)
    dls = cache.dataloaders(bs=4, device='cpu')
    x, y = dls.one_batch()
    assert type(y).__name__ == 'TensorMask' and y.dtype == torch.int64 and dls.vocab == ['background', 'digit']
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(src/'masks'/'0003.png')  # a label outside the codes
    with pytest.raises(Exception, match=r'0003\.png.*outside range\(2\)'):
        build_gray_cache(src, tmp_path/'cache2', 24, task='segment', n_workers=0, progress=False)

def test_items_and_getitem(tmp_path):
    src = _folder(tmp_path/'src', n=10)
    cache = build_gray_cache(src, tmp_path/'cache', 16, n_workers=0, progress=False)
    again = GrayCache(tmp_path/'cache')
    assert len(again) == 10 and again.size == 16 and again.path == tmp_path/'cache' and again.vocab == ['c0', 'c1']
    assert list(again.items.columns) == ['file', 'label', 'split', 'width', 'height']
    assert again.items['file'][0] == str(src/'c0'/'000.png') and (again.items['width'][0], again.items['height'][0]) == Image.open(src/'c0'/'000.png').size
    x, y = again[3]
    assert type(x).__name__ == 'TensorImageGray' and x.shape == (1, 16, 16) and torch.equal(x[0] * 255, torch.tensor(again.images[3], dtype=torch.float32))
    assert int(y) == again.vocab.index(again.items['label'][3])

def test_train_valid_folders_keep_their_split(tmp_path):
    _folder(tmp_path/'src'/'train', n=12); _folder(tmp_path/'src'/'valid', n=4, seed=1)
    cache = build_gray_cache(tmp_path/'src', tmp_path/'cache', 16, n_workers=0, progress=False)
    dls = cache.dataloaders(bs=4, device='cpu')
    assert len(dls.train_ds) == 12 and len(dls.valid_ds) == 4
    assert all('/valid/' in f for f in dls.valid_ds.items['file'])

def test_settings_reused_mismatch_named_overwrite(tmp_path):
    src = _folder(tmp_path/'src', n=8)
    cache = build_gray_cache(src, tmp_path/'cache', 16, n_workers=0, progress=False)
    stamp = (tmp_path/'cache'/'images.npy').stat().st_mtime_ns
    assert len(build_gray_cache(src, tmp_path/'cache', 16, n_workers=0, progress=False)) == 8
    assert (tmp_path/'cache'/'images.npy').stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(FileExistsError, match=r"size 16 \(now 24\).*method 'squish' \(now 'crop'\)"):
        build_gray_cache(src, tmp_path/'cache', 24, method='crop', n_workers=0, progress=False)
    assert build_gray_cache(src, tmp_path/'cache', 24, n_workers=0, progress=False, overwrite=True).size == 24
    assert GrayCache(tmp_path/'cache').size == 24 and not list(tmp_path.glob('.cache.*'))
    (tmp_path/'other').mkdir(); (tmp_path/'other'/'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='is not a gray cache'): build_gray_cache(src, tmp_path/'other', 16, progress=False)
    with pytest.raises(ValueError, match='method'): build_gray_cache(src, tmp_path/'x', 16, method='zoom')
    with pytest.raises(ValueError, match='size'): build_gray_cache(src, tmp_path/'x', 0)
    assert not (tmp_path/'x').exists()

def test_skip_bad(tmp_path):
    src = _folder(tmp_path/'src', n=10)
    (src/'c1'/'broken.png').write_bytes(b'not an image')
    with pytest.raises(UnreadableImagesError, match='1 of 11 image files cannot be read'):
        build_gray_cache(src, tmp_path/'cache', 16, n_workers=0, progress=False)
    assert not (tmp_path/'cache').exists()
    with pytest.warns(DatasetWarning, match='broken.png'):
        cache = build_gray_cache(src, tmp_path/'cache', 16, skip_bad=True, n_workers=0, progress=False)
    assert len(cache) == 10 and not any('broken' in f for f in cache.items['file'])

def test_damaged_cache_named(tmp_path):
    src = _folder(tmp_path/'src', n=6)
    build_gray_cache(src, tmp_path/'cache', 16, n_workers=0, progress=False)
    np.save(tmp_path/'cache'/'images.npy', np.zeros((5, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=r'images.npy holds uint8 \(5, 16, 16\).*damaged'): GrayCache(tmp_path/'cache')
    with pytest.raises(FileNotFoundError, match='no complete gray cache'): GrayCache(tmp_path/'nothing')

_BUILD = """
import sys; from fastai_gray.cache import build_gray_cache
build_gray_cache(sys.argv[1], sys.argv[2], 64, n_workers=1, progress=False)
"""

@pytest.mark.slow
def test_killed_build_never_opens_and_builds_again(tmp_path):
    from fastai_gray.datasets import digits_dataset
    src, dest = digits_dataset(tmp_path/'digits'), tmp_path/'cache'
    proc = subprocess.Popen([sys.executable, '-c', _BUILD, str(src), str(dest)], start_new_session=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob('.cache.building-*/images.npy')) and time.monotonic() < deadline and proc.poll() is None: time.sleep(0.05)
    time.sleep(0.3)  # mid-way through resizing
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert list(tmp_path.glob('.cache.building-*')), 'the build ended before it was killed'
    with pytest.raises(FileNotFoundError, match=r'no complete gray cache.*unfinished build'): GrayCache(dest)
    again = build_gray_cache(src, dest, 64, n_workers=2, progress=False)
    clean = build_gray_cache(src, tmp_path/'clean', 64, n_workers=0, progress=False)
    assert np.array_equal(again.images, clean.images) and again.items.equals(clean.items)
    assert not list(tmp_path.glob('.cache.*'))  # the killed build's folder is gone

def test_each_rank_its_share(tmp_path):
    from fastai.distributed import DistributedDL
    class LocalDL(DistributedDL):  # no process group: every rank draws the same order, as the broadcast makes it
        def _broadcast(self, t, rank): return list(t)
    cache = build_gray_cache(_folder(tmp_path/'src', n=30), tmp_path/'cache', 8, n_workers=0, progress=False)
    dl = cache.dataloaders(bs=4, device='cpu', shuffle=False).train
    shares = [torch.cat([x for x, _ in LocalDL(dl, rank=r, world_size=2)]) for r in range(2)]
    x, _ = _all(dl)
    assert len(shares[0]) == len(shares[1]) == len(x) // 2
    assert torch.equal(torch.cat(shares), x)

_EPOCH = """
import resource, sys, torch; torch.set_num_threads(1)
from fastai_gray.cache import GrayCache
dls = GrayCache(sys.argv[1]).dataloaders(bs=64, device='cpu')
x, y = dls.one_batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n = sum(len(x) for x, y in dls.train) + sum(len(x) for x, y in dls.valid)
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""

@pytest.mark.slow
def test_an_epoch_does_not_load_the_array(tmp_path):
    "A 256 MiB cache (64-px pictures, written directly) read through: peak memory grows by less than a tenth of it"
    src = _folder(tmp_path/'src', n=8)
    build_gray_cache(src, tmp_path/'cache', 64, n_workers=0, progress=False)
    n, d = 65536, tmp_path/'cache'
    a = np.lib.format.open_memmap(d/'images.npy', mode='w+', dtype=np.uint8, shape=(n, 64, 64))
    a[:] = np.arange(64, dtype=np.uint8) * 4
    a.flush(); del a
    import pandas as pd
    items = pd.read_csv(d/'items.csv')
    pd.concat([items] * (n // 8), ignore_index=True).to_csv(d/'items.csv', index=False)
    meta = json.loads((d/'cache.json').read_text()); meta['n'] = n; (d/'cache.json').write_text(json.dumps(meta))
    res = subprocess.run([sys.executable, '-c', _EPOCH, str(d)], capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert res.returncode == 0, res.stderr[-2000:]
    seen, grown = map(int, res.stdout.split()[-2:])
    assert seen >= n - 64 and grown < n * 64 * 64 / 10, f'peak memory grew by {grown / 2**20:.0f} MiB'

@pytest.mark.slow
def test_train_from_cache_predict_from_files(tmp_path):
    "gray_learner takes the cache's DataLoaders as they are: lr_find, fine_tune, show_batch/results; the learner and its model file predict from files as from the cache"
    import matplotlib; matplotlib.use('Agg')
    import fastai.callback.progress, fastai.callback.schedule  # Learner.no_bar, lr_find, fine_tune
    from fastai.metrics import accuracy
    from fastai.vision.models import resnet18
    from fastai_gray.learner import gray_learner
    from fastai_gray.safe import load_learner_safe
    from fastai_gray.train import predict_files
    from fastai_gray.datasets import digits_dataset
    from fastai.torch_core import set_seed
    cache = build_gray_cache(digits_dataset(tmp_path/'digits'), tmp_path/'cache', 16, n_workers=2, progress=False)
    set_seed(0)
    dls = cache.dataloaders(bs=64, device='cpu')
    learn = gray_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=3, show_plot=False)
        learn.fine_tune(1, 1e-2)
    assert learn.validate()[1] > 0.5  # 10 classes: chance is 0.1
    dls.show_batch(max_n=4); learn.show_results(max_n=4)
    files = list(cache.items['file'][dls.valid.rows[:8]])
    preds = torch.stack([learn.predict(f)[2] for f in files])
    from_cache = learn.get_preds(dl=[dls.valid.one_batch()])[0][:8]  # the same images, from the cache's array
    assert torch.allclose(preds, from_cache, atol=1e-4)
    assert learn.predict(files[0])[0] == cache.vocab[int(preds[0].argmax())]
    learn.export_safe(tmp_path/'model.safetensors')
    table = predict_files(load_learner_safe(tmp_path/'model.safetensors'), files)
    assert table['error'].isna().all()
    assert np.allclose(table['probability'], preds.max(1).values.numpy(), atol=1e-4)

@pytest.mark.slow
def test_unet_from_cache(tmp_path):
    import fastai.callback.progress
    from fastai.metrics import Dice
    from fastai.vision.models import resnet18
    from fastai_gray.unet import gray_unet_learner
    src = digits_segmentation_dataset(tmp_path/'seg', n=40, size=32)
    dls = build_gray_cache(src, tmp_path/'cache', 32, task='segment', n_workers=0, progress=False).dataloaders(bs=8, device='cpu')
    learn = gray_unet_learner(dls, resnet18, pretrained=False, metrics=Dice())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    mask, _, probs = learn.predict(dls.valid_ds.items['file'].iloc[0])
    assert mask.shape == (32, 32) and probs.shape == (2, 32, 32)

@pytest.mark.slow
def test_cli_cache_then_train_and_predict(tmp_path, capsys):
    from fastai_gray.cli import main
    from fastai_gray.cache import is_gray_cache
    src, dest = _folder(tmp_path/'src', n=16), tmp_path/'cache'
    assert main(['cache', str(src), str(dest), '--size', '16', '--workers', '0']) == 0
    out = capsys.readouterr().out
    assert f'{dest}: 16 images at 16 px (uint8), 2 classes' in out and 'images/s' in out
    train = ['--epochs', '1', '--bs', '4', '--arch', 'resnet18', '--no-pretrained']
    assert main(['train', str(dest), *train, '--out', str(tmp_path/'m.safetensors')]) == 0
    assert 'cache: 12 training and 4 validation images, 2 classes; resnet18 at 16 px' in capsys.readouterr().out
    assert main(['predict', str(tmp_path/'m.safetensors'), str(src/'c0'/'000.png')]) == 0
    assert capsys.readouterr().out.startswith(f"{src/'c0'/'000.png'}\tc")
    assert main(['train', str(src), '--cache', str(tmp_path/'built'), '--size', '16', *train, '--out', str(tmp_path/'n.safetensors')]) == 0
    assert is_gray_cache(tmp_path/'built')
    capsys.readouterr()
    assert main(['cache', str(src), str(dest), '--size', '24']) == 1
    assert 'size 16 (now 24)' in capsys.readouterr().err
    assert main(['train', str(dest), '--size', '24']) == 1
    assert 'size 16 (given 24)' in capsys.readouterr().err
    assert main(['cache', str(src), str(tmp_path/'x')]) == 2  # --size is required

def test_masks_with_a_mapping(tmp_path):
    "0/255 masks with mapping={255: 1}: the cache's labels are the file pipeline's, and the mapping is a setting of the cache"
    src = digits_segmentation_dataset(tmp_path/'seg', n=12, size=24)
    for f in (src/'masks').glob('*.png'): Image.fromarray(np.asarray(Image.open(f)) * 255).save(f)
    (src/'codes.txt').unlink()
    cache = build_gray_cache(src, tmp_path/'cache', 16, task='segment', mapping={255: 1}, n_workers=0, progress=False)
    assert cache.settings['mapping'] == [[255, 1]] and set(np.unique(cache.masks)) == {0, 1}
    _same_as_files(cache, _file_dls(src, 16, task='segment', mapping={255: 1}), exact=True)
    with pytest.raises(FileExistsError, match=r'mapping \[\[255, 1\]\] \(now None\)'):
        build_gray_cache(src, tmp_path/'cache', 16, task='segment', n_workers=0, progress=False)
