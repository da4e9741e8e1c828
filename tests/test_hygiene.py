"""What tests/conftest.py promises every test: no writes to the real home or cache, temp folders that go away, the
environment given back, and the shared `labelled_images` fixture."""
import os, tempfile
from pathlib import Path
import pytest
from PIL import Image
from fastai_gray.weights import cache_dir


def test_home_caches_and_temp_folder_are_the_runs_own(tmp_path):
    root = Path(tempfile.gettempdir()).parent  # the run's folder (tests/conftest.py), deleted when the run ends
    assert root.name.startswith('fastai_gray_tests_')
    for var in ('HOME', 'XDG_CACHE_HOME', 'XDG_CONFIG_HOME', 'FASTAI_HOME', 'IPYTHONDIR', 'HYPOTHESIS_STORAGE_DIRECTORY', 'TMPDIR'):
        assert Path(os.environ[var]).is_relative_to(root), var
    assert cache_dir().is_relative_to(root) and Path.home().is_relative_to(root)
    assert not tmp_path.is_relative_to(root)  # pytest's own, kept where a test fails

def test_environment_and_threads_are_given_back(pytester, monkeypatch):
    "A change a test leaves to os.environ or torch's threads is undone before the next test, and named in a warning"
    pytester.makeconftest((Path(__file__).parent/'conftest.py').read_text())
    pytester.makepyfile(test_env='''
import os, torch
def test_leaves(): os.environ['FASTAI_GRAY_LEFT'] = '1'; os.environ.pop('FASTAI_GRAY_SET'); torch.set_num_threads(1)
def test_sees(): assert 'FASTAI_GRAY_LEFT' not in os.environ and os.environ['FASTAI_GRAY_SET'] == 'x' and torch.get_num_threads() == 2
''')
    monkeypatch.setenv('FASTAI_GRAY_SET', 'x')
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    res = pytester.runpytest_subprocess('-W', 'default')
    res.assert_outcomes(passed=2, warnings=1)
    res.stdout.fnmatch_lines(['*LeftChanged: test_env.py::test_leaves left $FASTAI_GRAY_LEFT, $FASTAI_GRAY_SET, torch threads 2 -> 1 changed (restored)*'])

def test_labelled_images(labelled_images, tmp_path):
    folder = labelled_images(tmp_path/'data', classes=('a', 'b'), n=5, size=(10, 14))
    files = sorted(folder.rglob('*.png'))
    assert [f.relative_to(folder).as_posix() for f in files] == [f'{c}/{c}{i}.png' for c in 'ab' for i in range(5)]
    assert [Image.open(f).mode for f in files[:5]] == ['L', 'I;16', 'RGBA', 'RGB', 'P']
    assert Image.open(files[0]).size == (14, 10)
    dark, bright = (Image.open(folder/c/f'{c}0.png') for c in 'ab')
    assert max(dark.getdata()) < 60 <= 180 <= min(bright.getdata())
