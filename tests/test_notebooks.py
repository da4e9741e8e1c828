"""Every notebook in nbs/ is documentation and a test: run each one top to bottom, in this process.

The tutorials (nbs/tutorials/) train models: they are `slow`, with the module notebooks of `SLOW`; `make test-fast`
leaves these out. Seconds measured on 2 idle cores (the whole suite in one process, fastai already imported)."""
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook  # renamed so pytest does not collect it

ROOT = Path(__file__).parent.parent / 'nbs'
# nbs/ and its folders (nbs/tutorials/), but not hidden or underscore folders (.ipynb_checkpoints, _proc)
NBS = sorted(p for p in ROOT.rglob('*.ipynb') if not any(part.startswith(('.', '_')) for part in p.relative_to(ROOT).parts))
SLOW = {'03b_cache.ipynb': 20, '04_learner.ipynb': 10, '04c_train.ipynb': 12, '04d_explain.ipynb': 11}  # module notebooks over ~10 s: {notebook: seconds measured}

def _name(p:Path) -> str: return p.relative_to(ROOT).as_posix()
def _slow(p:Path) -> bool: return _name(p) in SLOW or _name(p).startswith('tutorials/')

@pytest.mark.parametrize('nb', [pytest.param(p, marks=pytest.mark.slow) if _slow(p) else p for p in NBS], ids=map(_name, NBS))
def test_notebook(nb):
    ok, secs = run_notebook(nb, showerr=True)
    assert ok, f'{nb.name} failed (see the cell error above)'

def test_slow_names_real_notebooks():
    "A renamed notebook must not drop out of the slow tier unnoticed"
    assert set(SLOW) <= {_name(p) for p in NBS}, f'SLOW names notebooks that do not exist: {set(SLOW) - {_name(p) for p in NBS}}'
