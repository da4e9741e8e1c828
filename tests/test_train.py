"`fastai_gray.train` without training: the size from the images, model and mask files written atomically and never over an existing one, lists of files, the CT-window check"
import warnings
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from fastai_gray.datasets import DatasetWarning
from fastai_gray.datasets import _check_ct_window
from fastai_gray.train import (SIZE_RANGE, default_size, expand_files, export_model, write_mask, _size_for,
                               _fitting_bs)


def test_default_size_follows_the_images(tmp_path):
    "The median shorter side, to the nearest multiple of 32, within SIZE_RANGE; 224 when no header can be read"
    def images(sides):
        files = []
        for i, (h, w) in enumerate(sides):
            files.append(tmp_path/f'{i}.png'); Image.fromarray(np.zeros((h, w), np.uint8)).save(files[-1])
        return files
    assert default_size(images([(64, 300), (70, 64), (60, 60)])) == 64
    assert default_size(images([(8, 8)] * 3)) == SIZE_RANGE[0] == 32
    assert default_size(images([(1000, 2000)] * 3)) == SIZE_RANGE[1] == 224
    assert [_size_for(s) for s in (47, 48, 79, 80, 200, None)] == [32, 64, 64, 96, 192, 224]
    pydicom = pytest.importorskip('pydicom')
    from pydicom.data import get_testdata_file
    assert default_size([get_testdata_file('CT_small.dcm')] * 2 + [tmp_path/'missing.png']) == 128  # 128 x 128, headers only


def test_bs_is_lowered_to_the_training_set():
    with pytest.warns(DatasetWarning, match='bs 32 is more than the 10 training images: lowered to 10'): assert _fitting_bs(32, 10) == 10
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert _fitting_bs(8, 10) == 8


class _Learner:
    "Writes a model file the way `learn.export` does, but fails half-way when told to"
    def __init__(self, fail=False): self.fail = fail
    def export(self, fname):
        Path(fname).write_bytes(b'half a ')
        if self.fail: raise KeyboardInterrupt  # killed while writing
        Path(fname).write_bytes(b'a whole model')


def test_export_model_is_atomic_and_keeps_existing_files(tmp_path):
    out = tmp_path/'m.pkl'
    assert export_model(_Learner(), out) == out and out.read_bytes() == b'a whole model'
    with pytest.raises(FileExistsError, match='exists; it was not replaced'): export_model(_Learner(), out)
    with pytest.raises(KeyboardInterrupt): export_model(_Learner(fail=True), out, overwrite=True)
    assert out.read_bytes() == b'a whole model' and [p.name for p in tmp_path.iterdir()] == ['m.pkl']  # no half file, no temp
    with pytest.raises(KeyboardInterrupt): export_model(_Learner(fail=True), tmp_path/'new.pkl')
    assert not (tmp_path/'new.pkl').exists()


def test_write_mask(tmp_path):
    mask = np.array([[0, 1], [2, 300]])
    assert write_mask(mask, tmp_path/'m.png') == tmp_path/'m.png'
    assert np.asarray(Image.open(tmp_path/'m.png')).tolist() == mask.tolist()
    with pytest.raises(FileExistsError, match='overwrite=True'): write_mask(mask % 2, tmp_path/'m.png')
    write_mask(mask % 2, tmp_path/'m.png', overwrite=True)
    assert Image.open(tmp_path/'m.png').mode == 'L' and [p.name for p in tmp_path.iterdir()] == ['m.png']


def test_expand_files(tmp_path):
    "Folders walked for image files, @lists and stdin read line by line, lazily and in order"
    import io
    (tmp_path/'d'/'sub').mkdir(parents=True)
    for name in ('d/b.png', 'd/sub/a.dcm', 'd/notes.txt', 'd/.hidden.png'): (tmp_path/name).write_bytes(b'')
    (tmp_path/'list.txt').write_text('x.png\n\ny.tif\r\n')
    got = expand_files([tmp_path/'d', f"@{tmp_path/'list.txt'}", 'z.png', '-'], stdin=io.StringIO('s1.png\ns2.png\n'))
    assert next(got) == tmp_path/'d'/'b.png'
    assert [str(f) for f in got] == [str(tmp_path/'d'/'sub'/'a.dcm'), 'x.png', 'y.tif', 'z.png', 's1.png', 's2.png']
    with pytest.raises(FileNotFoundError, match="list of files .*nope.txt"): expand_files(['a.png', f"@{tmp_path/'nope.txt'}"])
    endless = expand_files(['-'], stdin=(f'{i}.png\n' for i in range(10**12)))  # a list is never read whole
    assert [next(endless) for _ in range(3)] == ['0.png', '1.png', '2.png']


def test_ct_window_on_other_modalities_warns_once(tmp_path):
    pytest.importorskip('pydicom')
    from pydicom.data import get_testdata_file
    ct, mr = get_testdata_file('CT_small.dcm'), get_testdata_file('MR_small.dcm')
    with pytest.warns(DatasetWarning) as record: _check_ct_window([ct, mr, mr, tmp_path/'a.png'], 'lungs')
    assert len(record) == 1
    assert "window 'lungs' is a CT preset in Hounsfield units, but 2 of the 3 DICOM files are not CT (Modality: 2 MR)" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        _check_ct_window([ct, ct], 'lungs'); _check_ct_window([mr], 'dicom'); _check_ct_window([mr], (40, 80))
