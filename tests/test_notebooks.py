"Every notebook in nbs/ is documentation and a test: run each one top to bottom, in this process."
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook  # renamed so pytest does not collect it

ROOT = Path(__file__).parent.parent / 'nbs'
# nbs/ and its folders (nbs/tutorials/), but not hidden or underscore folders (.ipynb_checkpoints, _proc)
NBS = sorted(p for p in ROOT.rglob('*.ipynb') if not any(part.startswith(('.', '_')) for part in p.relative_to(ROOT).parts))

@pytest.mark.parametrize('nb', NBS, ids=[p.relative_to(ROOT).as_posix() for p in NBS])
def test_notebook(nb):
    ok, secs = run_notebook(nb, showerr=True)
    assert ok, f'{nb.name} failed (see the cell error above)'
