"DICOM input: fastai_gray.dicom and gray_image against pydicom's own modality and VOI transforms, on pydicom's bundled files"
import subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pytest
import fastai_gray.dicom

pydicom = pytest.importorskip('pydicom')
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from PIL import Image
from fastai_gray.core import luma
from fastai_gray.dicom import (WINDOWS, DICOM_TAGS, is_dicom, read_dicom, dicom_values, dicom_gray, dicom_headers,
                               window_range)
from fastai_gray.data import gray_image, verify_gray_images, GrayImageBlock, PILImageGray

def dataset(name):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return pydicom.dcmread(get_testdata_file(name))

def output_range(ds):
    "pydicom's output range of a window (PS3.3 C.11.2.1.2): the stored range through the rescale, or the VOI LUT's entries"
    if ds.get('VOILUTSequence'): return 0, 2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1
    if ds.get('ModalityLUTSequence'): return 0, 2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    b = ds.BitsStored
    lo, hi = (0, 2 ** b - 1) if ds.PixelRepresentation == 0 else (-2 ** (b - 1), 2 ** (b - 1) - 1)
    if 'RescaleSlope' in ds and 'RescaleIntercept' in ds:
        lo, hi = lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return lo, hi

def reference(ds, frame=None):
    "The picture by pydicom's own functions: modality LUT, first VOI (or the full range), MONOCHROME1 inverted, as 0..1"
    arr = ds.pixel_array if frame is None else ds.pixel_array[frame]
    values = apply_modality_lut(arr, ds)
    lo, hi = output_range(ds)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = (apply_voi_lut(values, ds, index=0).astype(np.float64) - lo) / (hi - lo)
    return 1 - out if ds.PhotometricInterpretation == 'MONOCHROME1' else out

MONO = ['CT_small.dcm',                    # CT, explicit VR little endian, rescale to HU, no window
        'MR_small.dcm',                    # MR, explicit VR little endian, a window
        'MR_small_bigendian.dcm', 'MR_small_expb.dcm',  # explicit VR big endian
        'MR_small_implicit.dcm',           # implicit VR little endian
        'MR_small_RLE.dcm',                # RLE lossless
        'MR_small_jp2klossless.dcm',       # JPEG 2000 lossless
        'MR_small_jpeg_ls_lossless.dcm',   # JPEG-LS lossless
        'MR_small_padded.dcm',
        'image_dfl.dcm',                   # deflated explicit VR little endian, 8-bit
        'JPEG2000.dcm',                    # JPEG 2000, signed
        '693_J2KI.dcm',                    # CT, JPEG 2000 lossy, rescale and window
        'JPGExtended.dcm',                 # JPEG extended (12-bit)
        'JPEGLSNearLossless_16.dcm',       # JPEG-LS near lossless
        'examples_overlay.dcm']

@pytest.mark.parametrize('name', MONO)
def test_monochrome_as_pydicom(name):
    ds = dataset(name)
    expected = reference(ds)
    np.testing.assert_allclose(dicom_gray(get_testdata_file(name)), expected, atol=1e-6)
    np.testing.assert_allclose(dicom_values(get_testdata_file(name)), apply_modality_lut(ds.pixel_array, ds), atol=1e-9)
    g = gray_image(get_testdata_file(name))
    assert (g.mode, g.size) == ('F', (ds.Columns, ds.Rows))
    np.testing.assert_allclose(np.asarray(g), expected * 255, atol=1e-3)

def test_mr_syntaxes_agree():
    "One MR slice stored with 8 lossless transfer syntaxes is one picture"
    pictures = [dicom_gray(get_testdata_file(n)) for n in MONO[1:9]]
    for p in pictures[1:]: np.testing.assert_array_equal(p, pictures[0])

def test_ct_in_hounsfield_units():
    ds = dataset('CT_small.dcm')
    hu = dicom_values(get_testdata_file('CT_small.dcm'))
    np.testing.assert_array_equal(hu, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    for name, (c, w) in WINDOWS.items():
        np.testing.assert_allclose(dicom_gray(get_testdata_file('CT_small.dcm'), window=name),
                                   np.clip((hu - (c - w / 2)) / w, 0, 1), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(dicom_gray(get_testdata_file('CT_small.dcm'), window=(-600, 1500)),
                               dicom_gray(get_testdata_file('CT_small.dcm'), window='lungs'))
    assert window_range('lungs') == (-1350, 150)

CR = sorted(p for p in (Path(get_testdata_file('DICOMDIR')).parent/'77654033').glob('CR*/*'))

@pytest.mark.parametrize('path', CR, ids=[p.parent.name for p in CR])
def test_monochrome1_inverted(path):
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == 'MONOCHROME1'
    lo, hi = output_range(ds)
    shown = (apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64) - lo) / (hi - lo)
    np.testing.assert_allclose(dicom_gray(path), 1 - shown, atol=1e-6)
    v = dicom_values(path)
    np.testing.assert_allclose(dicom_gray(path, window='minmax'), 1 - (v - v.min()) / (v.max() - v.min()), atol=1e-6)
    # the highest value is the darkest pixel, as a viewer shows MONOCHROME1
    assert dicom_gray(path, window='minmax').ravel()[v.argmax()] == 0

def test_monochrome1_made_from_monochrome2():
    "The same values stored as MONOCHROME1 show as the negative of the MONOCHROME2 picture"
    ds = dataset('MR_small.dcm')
    ds.PhotometricInterpretation = 'MONOCHROME1'
    for window in (None, (600, 1600), 'minmax'):
        np.testing.assert_allclose(dicom_gray(ds, window=window), 1 - dicom_gray(get_testdata_file('MR_small.dcm'), window=window), atol=1e-6)

def test_voi_lut_and_functions():
    "A VOI LUT (preferred over a window, as pydicom does), a Modality LUT, and the linear exact and sigmoid window functions"
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    ds = dataset('MR_small.dcm')
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.LUTData = [min(4095, 2 * i) for i in range(4096)]
    ds.VOILUTSequence = Sequence([lut])
    np.testing.assert_allclose(dicom_gray(ds), reference(ds), atol=1e-6)
    np.testing.assert_allclose(dicom_gray(ds), np.minimum(4095, 2 * ds.pixel_array) / 4095, atol=1e-6)
    for function in ('LINEAR_EXACT', 'SIGMOID'):
        ds = dataset('MR_small.dcm')
        ds.VOILUTFunction = function
        np.testing.assert_allclose(dicom_gray(ds), reference(ds), atol=1e-6)
    ds = dataset('MR_small.dcm')
    del ds.WindowCenter, ds.WindowWidth
    mod = Dataset()
    mod.LUTDescriptor = [4096, 0, 16]
    mod.LUTData = [16 * i for i in range(4096)]
    ds.ModalityLUTSequence = Sequence([mod])
    np.testing.assert_allclose(dicom_values(ds), 16. * ds.pixel_array)
    np.testing.assert_allclose(dicom_gray(ds), 16. * ds.pixel_array / 65535, atol=1e-6)

def test_path_bytes_dataset_agree(tmp_path):
    f = get_testdata_file('MR_small.dcm')
    (tmp_path/'no_suffix').write_bytes(Path(f).read_bytes())
    srcs = [f, Path(f), Path(f).read_bytes(), read_dicom(f), tmp_path/'no_suffix', str(tmp_path/'no_suffix')]
    assert all(is_dicom(s) for s in srcs)
    images = [np.asarray(gray_image(s, window=w)) for w in (None, 'minmax', (500, 1000)) for s in srcs]
    for i in range(0, len(images), len(srcs)):
        for im in images[i:i + len(srcs)]: np.testing.assert_array_equal(im, images[i])
    assert type(PILImageGray.create(f)) is PILImageGray

@pytest.mark.parametrize('name', ['SC_rgb_small_odd.dcm', 'SC_rgb_small_odd_big_endian.dcm', 'SC_rgb_jpeg.dcm',
                                  'SC_rgb_rle.dcm', 'SC_rgb_rle_16bit.dcm', 'SC_rgb_jpeg_gdcm.dcm', 'SC_ybr_full_422_uncompressed.dcm',
                                  'GDCMJ2K_TextGBR.dcm', 'examples_palette.dcm'])
def test_color_as_luma(name):
    ds = dataset(name)
    rgb = ds.pixel_array
    white = 2 ** ds.BitsStored - 1
    if ds.PhotometricInterpretation == 'PALETTE COLOR':
        rgb = pydicom.pixels.apply_color_lut(rgb, ds)
        white = 2 ** ds.RedPaletteColorLookupTableDescriptor[2] - 1
    expected = luma(rgb.astype(float), dim=-1)[..., 0]
    np.testing.assert_allclose(dicom_values(get_testdata_file(name)), expected, atol=1e-9)
    np.testing.assert_allclose(dicom_gray(get_testdata_file(name)), expected / white, atol=1e-6)

def test_frames():
    f = get_testdata_file('rtdose.dcm')
    ds = dataset('rtdose.dcm')
    for frame in (0, 7, 14):
        np.testing.assert_allclose(dicom_gray(f, frame=frame), reference(ds, frame), atol=1e-6)
    with pytest.raises(ValueError, match=r"has 15 frames; pick one with frame= \(0 to 14\)"): gray_image(f)
    with pytest.raises(ValueError, match='frame=15 is out of range'): gray_image(f, frame=15)
    color = get_testdata_file('examples_ybr_color.dcm')
    rgb = dataset('examples_ybr_color.dcm').pixel_array[5]
    np.testing.assert_allclose(dicom_gray(color, frame=5), luma(rgb.astype(float), dim=-1)[..., 0] / 255, atol=1e-6)
    with pytest.raises(ValueError, match='has 30 frames'): dicom_gray(color)

def test_named_errors(tmp_path):
    "Each failure is an error that names the file and says why; OSError for unreadable data, ValueError for the rest"
    mr = Path(get_testdata_file('MR_small.dcm')).read_bytes()
    (tmp_path/'text.dcm').write_text('patient notes, not an image')
    (tmp_path/'photo.dicom').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(100))
    (tmp_path/'header_cut.dcm').write_bytes(mr[:140])
    (tmp_path/'pixels_cut.dcm').write_bytes(mr[:5000])
    (tmp_path/'tags_cut.dcm').write_bytes(mr[:400])
    bare = pydicom.Dataset()  # a transfer syntax, a patient, and nothing that says what the object is
    bare.file_meta = pydicom.dataset.FileMetaDataset()
    bare.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    bare.preamble, bare.PatientID = bytes(128), 'P1'
    bare.save_as(tmp_path/'meta_only.dcm', enforce_file_format=False)
    (tmp_path/'no_pixels.dcm').write_bytes(mr[:mr.rindex(b'\xe0\x7f\x10\x00')])  # up to the Pixel Data element (7fe0,0010)
    cases = {
        tmp_path/'text.dcm': (OSError, 'it is not a DICOM file'),
        tmp_path/'photo.dicom': (OSError, 'it is not a DICOM file'),
        tmp_path/'missing.dcm': (FileNotFoundError, 'No such file'),
        tmp_path/'header_cut.dcm': (OSError, 'no Transfer Syntax UID'),
        tmp_path/'pixels_cut.dcm': (OSError, 'pixel data is cut short or corrupt'),
        tmp_path/'no_pixels.dcm': (OSError, 'describes a 64x64 image but has no pixel data'),
        tmp_path/'tags_cut.dcm': (OSError, 'it is a MR Image Storage but has no pixel data (cut short?)'),
        tmp_path/'meta_only.dcm': (OSError, 'has no pixel data and not even a SOP Class UID'),
        get_testdata_file('MR_truncated.dcm'): (OSError, 'pixel data is cut short or corrupt'),
        get_testdata_file('rtplan.dcm'): (ValueError, 'has no pixel data: it is a RT Plan Storage (Modality RTPLAN)'),
        get_testdata_file('DICOMDIR'): (ValueError, 'has no pixel data: it is a Media Storage Directory Storage'),
        get_testdata_file('test-SR.dcm'): (ValueError, 'has no pixel data: it is a Comprehensive SR Storage'),
        get_testdata_file('JPEG-lossy.dcm'): (OSError, 'transfer syntax JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51) '
                                                       'could not be decoded here; the decoders for JPEG, JPEG-LS, JPEG 2000 and RLE come with pip install "fastai_gray[dicom]"'),
    }
    for f, (cls, why) in cases.items():
        for read in (dicom_gray, gray_image):
            with pytest.raises(cls) as e: read(f)
            assert str(f) in str(e.value) and why in str(e.value), (f, str(e.value))
    with pytest.raises(ValueError, match="has no window .* for window='dicom'"): gray_image(get_testdata_file('CT_small.dcm'), window='dicom')
    ds = dataset('MR_small.dcm')
    ds.WindowWidth = 0
    with pytest.raises(ValueError, match='its VOI LUT or window cannot be applied'): dicom_gray(ds)
    with pytest.raises(ValueError, match='window is'): gray_image(get_testdata_file('MR_small.dcm'), window='lung')
    with pytest.raises(OSError, match=r'<140 bytes>'): gray_image(mr[:140])
    # the same reasons, listed per file, by verify_gray_images
    problems = verify_gray_images([f for f in cases if Path(f).exists()] + [get_testdata_file('CT_small.dcm')], n_workers=0)
    assert len(problems) == len(cases) - 1
    for f, reason in problems: assert str(f) in reason

def test_without_pydicom(monkeypatch, tmp_path):
    "Without pydicom, a DICOM file is an error that names the extra; other images are read as ever"
    for name in [m for m in sys.modules if m == 'pydicom' or m.startswith('pydicom.')]: monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(fastai_gray.dicom, '_PYDICOM', None)  # the module imported once, forgotten
    with pytest.raises(ModuleNotFoundError, match=r'pip install "fastai_gray\[dicom\]"'): gray_image(get_testdata_file('CT_small.dcm'))
    with pytest.raises(ModuleNotFoundError, match=r'fastai_gray\[dicom\]'): dicom_headers([get_testdata_file('CT_small.dcm')])
    Image.fromarray(np.full((2, 2), 7, np.uint8)).save(tmp_path/'a.png')
    assert np.asarray(gray_image(tmp_path/'a.png')).tolist() == [[7, 7], [7, 7]]

def test_headers(tmp_path):
    files = [get_testdata_file(n) for n in ('CT_small.dcm', 'MR_small.dcm', 'rtplan.dcm')] + [tmp_path/'bad.dcm']
    (tmp_path/'bad.dcm').write_text('no')
    df = dicom_headers(files)
    assert list(df.columns) == ['path', *DICOM_TAGS, 'error'] and len(df) == 4
    assert df.Modality.tolist()[:3] == ['CT', 'MR', 'RTPLAN']
    assert df.PatientID.tolist()[:2] == ['1CT1', '4MR1']
    assert df.WindowCenter.iloc[1] == 600. and df.Rows.iloc[0] == 128
    assert df.error.iloc[:3].isna().all() and 'not a DICOM file' in df.error.iloc[3]

def test_dicom_folder_in_a_datablock(tmp_path):
    "DICOM and PNG files in one DataBlock: one batch of gray images, DICOM pictures through the given window"
    from fastai.data.block import DataBlock, CategoryBlock
    from fastai.data.transforms import parent_label
    from fastai.vision.augment import Resize
    for i, p in enumerate(sorted(Path(get_testdata_file('DICOMDIR')).parent.glob('77654033/CT2/*'))):
        (tmp_path/f'c{i % 2}').mkdir(exist_ok=True)
        (tmp_path/f'c{i % 2}'/f'{i}.dcm').write_bytes(p.read_bytes())
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path/'c0'/'gray.png')
    files = sorted(tmp_path.rglob('*.*'))
    dblock = DataBlock(blocks=(GrayImageBlock(window='minmax'), CategoryBlock), get_items=lambda _: files,
                       get_y=parent_label, splitter=lambda o: (list(range(len(o))), [0]), item_tfms=Resize(16))
    dls = dblock.dataloaders(tmp_path, bs=5, num_workers=0, device='cpu')  # compared as numpy arrays below
    x, y = dls.train.new(shuffle=False).one_batch()
    assert x.shape == (5, 1, 16, 16) and 0 <= x.min() and x.max() <= 1
    for i, f in enumerate(dls.train_ds.items):
        if f.suffix == '.dcm': np.testing.assert_allclose(x[i, 0].numpy(), dicom_gray(f, window='minmax'), atol=1e-5)

def test_enhanced_multiframe_functional_groups():
    "An enhanced multi-frame file: the rescale shared by all frames, a window per frame, from its functional groups"
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    ds = dataset('MR_small.dcm')
    a = ds.pixel_array.astype(np.uint16)
    ds.set_pixel_data(np.stack([a, a]), 'MONOCHROME2', 16)
    del ds.WindowCenter, ds.WindowWidth
    def group(**attrs):
        item = Dataset()
        for k, v in attrs.items(): setattr(item, k, v)
        return Sequence([item])
    shared = Dataset()
    shared.PixelValueTransformationSequence = group(RescaleSlope=2, RescaleIntercept=-100, RescaleType='US')
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for center, width in ((1000, 2000), (2000, 1000)):
        g = Dataset()
        g.FrameVOILUTSequence = group(WindowCenter=center, WindowWidth=width)
        frames.append(g)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    for frame, (center, width) in enumerate(((1000, 2000), (2000, 1000))):
        np.testing.assert_array_equal(dicom_values(ds, frame=frame), 2. * a - 100)
        v = 2. * a - 100
        expected = np.clip(((v - (center - 0.5)) / (width - 1) + 0.5), 0, 1)  # DICOM's linear window
        np.testing.assert_allclose(dicom_gray(ds, frame=frame), expected, atol=1e-6)
    assert 'RescaleSlope' not in ds and 'WindowCenter' not in ds  # the file is not changed

def test_every_bundled_file_reads_or_says_why():
    "Each of pydicom's ~170 test files is read, or is one (file, reason) of verify_gray_images: no other exception escapes"
    root = Path(get_testdata_file('CT_small.dcm')).parent
    files = sorted(p for p in root.rglob('*') if p.is_file() and is_dicom(p))
    assert len(files) > 150
    problems = dict(verify_gray_images(files, n_workers=0))
    assert 70 < len(problems) < len(files) - 70, len(problems)
    for f, reason in problems.items(): assert str(f) in reason
    read = [f for f in files if f not in problems]
    assert {f.name for f in read} >= {'CT_small.dcm', 'MR_small_RLE.dcm', 'JPEG2000.dcm', 'SC_rgb_jpeg.dcm', '6154'}


def test_threads_leave_warning_filters_alone(tmp_path):
    "Reading DICOM files in threads (verify_gray_images, dicom_headers) leaves the process's warning filters as they were"
    src = Path(get_testdata_file('CT_small.dcm')).read_bytes()
    files = []
    for i in range(24):
        files.append(tmp_path/f'{i}.dcm'); files[-1].write_bytes(src)
    before = list(warnings.filters)
    for _ in range(3):
        assert not verify_gray_images(files, n_workers=4)
        assert len(dicom_headers(files, n_workers=4)) == 24
    assert warnings.filters == before
    with pytest.warns(UserWarning, match='still shown'): warnings.warn('still shown')


# ---------------------------------------------------------------------------------------------------- fresh processes
# Threads that read DICOM files import pydicom lazily, all at the same moment, in a process that has not imported it yet:
# each must wait for the one import, never see the half-imported module (`partially initialized module 'pydicom' has no
# attribute 'Dataset'`). The test process imported pydicom long ago, so these run in fresh processes.

READ_IN_THREADS = '''
import sys
from concurrent.futures import ProcessPoolExecutor
import multiprocessing as mp
from pathlib import Path
from fastai_gray.data import verify_gray_images
assert 'pydicom' not in sys.modules
files = sorted(Path(sys.argv[1]).rglob('*.dcm'))
def check(files):
    bad = verify_gray_images(files, n_workers=8)
    assert not bad, list(bad)
    return len(files)
if __name__ == '__main__':
    assert check(files) == len(files)
    if len(sys.argv) > 2:  # and worker processes (fresh ones: spawned), each reading in threads
        with ProcessPoolExecutor(2, mp_context=mp.get_context('spawn')) as ex: assert sum(ex.map(check, [files] * 2)) == 2 * len(files)
    print('read', len(files))
'''

def dicom_folder(root:Path, n:int=8) -> Path:
    "`root` with class folders ct/ and mr/ of `n` copies each of pydicom's CT_small.dcm and MR_small.dcm"
    for c, name in (('ct', 'CT_small.dcm'), ('mr', 'MR_small.dcm')):
        (root/c).mkdir(parents=True, exist_ok=True)
        src = Path(get_testdata_file(name)).read_bytes()
        for i in range(n): (root/c/f'{c}{i}.dcm').write_bytes(src)
    return root

def read_in_fresh_processes(tmp_path, n:int, *extra) -> list:
    "Run READ_IN_THREADS on a DICOM folder in `n` fresh Python processes, two at a time; the failures' stderr"
    folder, script = dicom_folder(tmp_path/'dcm'), tmp_path/'read.py'
    script.write_text(READ_IN_THREADS)
    failed = []
    for i in range(0, n, 2):
        procs = [subprocess.Popen([sys.executable, script, folder, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(min(2, n - i))]
        for p in procs:
            out, err = p.communicate(timeout=300)
            if p.returncode != 0 or 'read 16' not in out: failed.append(err.strip().splitlines()[-1:])
    return failed

def test_threads_read_dicom_in_a_fresh_process(tmp_path):
    "A fresh process reads a DICOM folder in 8 threads: pydicom imported once, by one thread, the others wait for it"
    assert read_in_fresh_processes(tmp_path, 1) == []

@pytest.mark.slow
def test_threads_and_processes_read_dicom_many_times(tmp_path):
    "20 fresh processes, each reading a DICOM folder in threads, then in 2 spawned worker processes of threads each"
    failed = read_in_fresh_processes(tmp_path, 20, 'processes')
    assert failed == [], f"{len(failed)} of 20 failed: {failed[:3]}"

@pytest.mark.slow
def test_train_on_a_dicom_folder(tmp_path):
    "`fastai-gray train` on a folder of DICOM class folders, in a fresh process (pydicom not imported before)"
    folder, model = dicom_folder(tmp_path/'dcm'), tmp_path/'dcm.safetensors'
    r = subprocess.run([sys.executable, '-m', 'fastai_gray', 'train', folder, '--epochs', '1', '--size', '32', '--bs', '4',
                        '--out', model], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert '12 training and 4 validation images, 2 classes' in r.stdout and model.is_file()
