"""What every test shares, notebooks included (tests/test_notebooks.py runs them in this process).

Hygiene. A test run writes nothing to the user's home or cache: from the start of the run (collection included) to its
end, `$HOME`, `$XDG_CACHE_HOME` (fastai_gray's `cache_dir()`, torch's, Hugging Face's, matplotlib's),
`$XDG_CONFIG_HOME`, `$FASTAI_HOME`, `$IPYTHONDIR` and `$HYPOTHESIS_STORAGE_DIRECTORY` (else .hypothesis/ in the working
folder) point into one temporary folder, which is deleted afterwards and the variables restored (so the Lite0 checkpoint
is converted once per run, about a second). `tempfile`'s folder is in there too: a folder a test or notebook makes with
`tempfile.mkdtemp()` and does not delete goes with it. pytest's `tmp_path` folders are deleted when the run passes
(setup.cfg: `tmp_path_retention_policy = failed`) and kept where a test failed. Each test, and each notebook, gets
`os.environ` and torch's thread count back as they were: a change it leaves is undone and named in a warning
(`LeftChanged`).

Tiers (markers in setup.cfg). `slow`: trains a model or takes over ~10 s; `make test-fast` leaves these out. `browser`:
drives headless Chromium; where Chromium is missing such a test is skipped with the reason, except in CI (`CI=true`),
where it fails: CI must check the docs site. `cuda`: needs a CUDA GPU (tests/test_gpu.py, `make test-gpu`); where torch
sees none such a test is skipped with the reason, except where `CI_GPU=true` (a GPU machine's run), where it fails.

Devices. The header of a run says which device it uses: fastai's DataLoaders put batches on a CUDA GPU where there is
one, so a test that calls a model by hand or compares with the CPU's float32 pins its DataLoaders to the CPU
(`device='cpu'`). The fixture `default_device_elsewhere` checks that on any machine: fastai's `default_device()` is the
`meta` device for the test, so whatever follows the default device instead of the DataLoaders' fails, as it would on a GPU.

Fixtures. `labelled_images`: tiny labelled image folders, in assorted PIL modes. `chromium`: the browser's path.
`default_device_elsewhere`: fastai's default device is not the CPU (above).
"""
import os, shutil, tempfile, warnings
from pathlib import Path
import numpy as np
import pytest

pytest_plugins = ['pytester']  # tests/test_docs.py runs pytest on a small file to check the browser tests' skip

# ---------------------------------------------------------------------------------------------------- hygiene

PRIVATE = {'HOME': 'home', 'XDG_CACHE_HOME': 'cache', 'XDG_CONFIG_HOME': 'config', 'FASTAI_HOME': 'fastai', 'IPYTHONDIR': 'ipython',
           'HYPOTHESIS_STORAGE_DIRECTORY': 'hypothesis'}
_saved, _root = {}, None

def pytest_configure(config):
    "Before collection: the folders of `PRIVATE` in a fresh temporary folder, the real values kept to restore"
    global _root
    _root = Path(tempfile.mkdtemp(prefix='fastai_gray_tests_'))
    for var, sub in PRIVATE.items():
        _saved[var] = os.environ.get(var)
        (_root/sub).mkdir()
        os.environ[var] = str(_root/sub)

def pytest_unconfigure(config):
    for var, value in _saved.items():
        if value is None: os.environ.pop(var, None)
        else: os.environ[var] = value
    _saved.clear()
    if _root is not None: shutil.rmtree(_root, ignore_errors=True)

@pytest.fixture(scope='session', autouse=True)
def private_tmp(tmp_path_factory):
    """`tempfile`'s folder (`mkdtemp`, `TemporaryDirectory`; `$TMPDIR` for subprocesses) in the run's temporary folder,
    so that what a test or notebook forgets to delete goes with it; pytest's own `tmp_path` folders stay where they are"""
    tmp_path_factory.getbasetemp()  # made now, in the real temporary folder: pytest keeps a failed test's folder there
    tmp, before, env = _root/'tmp', tempfile.tempdir, os.environ.get('TMPDIR')
    tmp.mkdir(exist_ok=True)
    tempfile.tempdir, os.environ['TMPDIR'] = str(tmp), str(tmp)
    yield tmp
    tempfile.tempdir = before
    if env is None: os.environ.pop('TMPDIR', None)
    else: os.environ['TMPDIR'] = env

# set by pytest for each test, and by `import torch` (2.14) the first time a test imports it: not a test's doing, left as set
SET_BY_IMPORTS = {'PYTEST_CURRENT_TEST', 'KMP_DUPLICATE_LIB_OK', 'KMP_INIT_AT_FORK', 'TORCHINDUCTOR_CACHE_DIR'}

class LeftChanged(UserWarning):
    "A test or notebook left global state (environment variables, torch threads) changed; it was restored"

@pytest.fixture(autouse=True)
def restore_environment(request):
    "`os.environ` and torch's thread count as they were before the test, whatever the test did"
    env = dict(os.environ)
    torch = __import__('sys').modules.get('torch')
    threads = torch.get_num_threads() if torch else None
    yield
    now = dict(os.environ)
    changed = sorted(k for k in env.keys() | now.keys() if env.get(k) != now.get(k) and k not in SET_BY_IMPORTS)
    for k in changed:
        if k in env: os.environ[k] = env[k]
        else: del os.environ[k]
    left = [f'${k}' for k in changed]
    if threads is not None and torch.get_num_threads() != threads:
        left.append(f'torch threads {threads} -> {torch.get_num_threads()}')
        torch.set_num_threads(threads)
    if left: warnings.warn(f'{request.node.nodeid} left {", ".join(left)} changed (restored)', LeftChanged)


# ---------------------------------------------------------------------------------------------------- tiers

def in_ci() -> bool:
    "Whether this is a CI run (`CI=true`, as GitHub Actions and .ci/run set it)"
    return os.environ.get('CI', '').strip().lower() in ('true', '1', 'yes')

def find_chromium() -> str|None:
    "Chromium's path: `$CHROMIUM`, else `chromium` or `chromium-browser` on the PATH; None when there is none"
    for p in (os.environ.get('CHROMIUM'), shutil.which('chromium'), shutil.which('chromium-browser')):
        if p and Path(p).exists(): return p
    return None

NO_CHROMIUM = ('Chromium is not installed (`apt-get install -y chromium` on Debian, or set $CHROMIUM to its path); '
               'the docs site is checked in a browser')

def gpu_required() -> bool:
    "Whether this run must have a CUDA GPU (`CI_GPU=true`): a `cuda` test fails instead of skipping"
    return os.environ.get('CI_GPU', '').strip().lower() in ('true', '1', 'yes')

NO_CUDA = 'no CUDA GPU: torch.cuda.is_available() is False here; the GPU tier (`make test-gpu`) runs where there is one'

def pytest_runtest_setup(item):
    """A `browser` test without Chromium: skipped with the reason, or a failure in CI; a `cuda` test without a CUDA GPU:
    skipped with the reason, or a failure where `CI_GPU=true`; before any of its fixtures run"""
    if item.get_closest_marker('browser') and not find_chromium():
        if in_ci(): pytest.fail(f'{NO_CHROMIUM}, and in CI (CI=true) it must be', pytrace=False)
        pytest.skip(NO_CHROMIUM)
    if item.get_closest_marker('cuda'):
        import torch
        if not torch.cuda.is_available():
            if gpu_required(): pytest.fail(f'{NO_CUDA}, and CI_GPU=true asks for one', pytrace=False)
            pytest.skip(NO_CUDA)

def pytest_report_header(config):
    "Which device the run uses: where fastai's DataLoaders put batches, and the TF32 settings a CUDA run compares under"
    import torch
    if not torch.cuda.is_available():
        return (f"device: cpu (torch {torch.__version__} sees no CUDA GPU): the `cuda` tests "
                + ('fail (CI_GPU=true)' if gpu_required() else 'are skipped'))
    return (f"device: cuda ({torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}): fastai's "
            f"DataLoaders put batches there unless a test pins them; TF32 for cuDNN convolutions {torch.backends.cudnn.allow_tf32}, "
            f"for matmuls {torch.backends.cuda.matmul.allow_tf32}")

@pytest.fixture
def default_device_elsewhere(monkeypatch):
    """fastai's `default_device()` is the `meta` device during the test (in every fastai and fastai_gray module that bound
    it): a batch, a statistic or a model that follows it instead of the DataLoaders' device fails, as on a CUDA machine"""
    import sys, torch
    import fastai.torch_core as tc
    original = tc.default_device
    def meta(use=-1): return torch.device('meta')
    for name, module in list(sys.modules.items()):
        if name.split('.')[0] in ('fastai', 'fastai_gray') and getattr(module, 'default_device', None) is original:
            monkeypatch.setattr(module, 'default_device', meta)
    yield torch.device('meta')

@pytest.fixture(scope='session')
def chromium() -> str:
    "The path of Chromium (a `browser` test only runs when there is one)"
    exe = find_chromium()
    if exe is None: pytest.fail(NO_CHROMIUM, pytrace=False)
    return exe


# ---------------------------------------------------------------------------------------------------- data

def class_image(cls:str, i:int, mode:str='L', size:int|tuple=12):
    """A PIL image of class `cls` in PIL `mode` ('L', 'I;16', 'RGB', 'RGBA', 'P', ...), `size` pixels square or `(height,
    width)`, the `i`-th of its class: class 'a' dark, 'b' bright, 'c' striped (any other name dark, with its own noise), so
    a model can learn them. 'I;16' holds the 8-bit values times 257 (the full 16-bit range)"""
    from PIL import Image
    rng = np.random.default_rng(100 * sum(map(ord, cls)) + i)
    a = rng.integers(0, 60, (size, size) if isinstance(size, int) else tuple(size)) + (180 if cls == 'b' else 0)
    if cls == 'c': a[::2] += 190
    a = a.clip(0, 255).astype(np.uint8)
    if mode == 'I;16': return Image.fromarray(a.astype(np.uint16) * 257)
    if mode == 'RGBA': return Image.fromarray(np.stack([a, a, a, np.full_like(a, 255)], -1), 'RGBA')
    return Image.fromarray(a).convert(mode)

MODES = ('L', 'I;16', 'RGBA', 'RGB', 'P')

def write_labelled_images(folder, classes=('a', 'b', 'c'), n:int=8, modes=MODES, size:int|tuple=12, suffix:str='.png') -> Path:
    "`n` images per class in `folder/<class>/<class><i><suffix>`, cycling through PIL `modes`; returns `folder`"
    folder = Path(folder)
    for c in classes:
        (folder/c).mkdir(parents=True, exist_ok=True)
        for i in range(n): class_image(c, i, modes[i % len(modes)], size).save(folder/c/f'{c}{i}{suffix}')
    return folder

@pytest.fixture(scope='session')
def labelled_images():
    """`write_labelled_images(folder, classes=('a', 'b', 'c'), n=8, modes=MODES, size=12, suffix='.png')`: tiny labelled
    image folders (`folder/<class>/*.png`) for fastai's `parent_label`; with `tmp_path` or `tmp_path_factory`"""
    return write_labelled_images
