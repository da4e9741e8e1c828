"Every notebook in nbs/ is documentation and a test: run each one top to bottom, in this process."
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook  # renamed so pytest does not collect it

NBS = sorted((Path(__file__).parent.parent / 'nbs').glob('*.ipynb'))

@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_notebook(nb):
    ok, secs = run_notebook(nb, showerr=True)
    assert ok, f'{nb.name} failed (see the cell error above)'
