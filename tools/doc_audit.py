"""Which public names of a module page have no visible example with its output.

    python tools/doc_audit.py                  # every module notebook in nbs/
    python tools/doc_audit.py nbs/02_stem.ipynb

A module page teaches by showing: each public function and class of its `__all__` appears in a code cell that the
site shows (not exported, not `#| hide`) and that has saved outputs (`python tools/docs.py run NB`). Constants
(`ALL_CAPS`) are exempt: the docs build shows each one's definition. Exit 1 when a name is missing;
tests/test_hygiene.py runs `missing_examples` over every page.
"""
from __future__ import annotations
import ast, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = ('export', 'exports', 'exporti', 'hide')  # cells of these directives are not shown as examples
NOT_PAGES = {'__main__', 'all'}  # modules whose page documents nothing of its own

def _directives(src:str) -> set[str]:
    return {m.group(1) for m in re.finditer(r'^#\|\s*([\w-]+)', src, re.M)}

def module_of(cells) -> str|None:
    "The module a notebook's `#| default_exp` names, or None"
    for c in cells:
        if c['cell_type'] == 'code' and (m := re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M)): return m.group(1)

def public_names(module:str) -> list[str]:
    "The `__all__` of fastai_gray/`module`.py, read without importing it"
    tree = ast.parse((ROOT/'fastai_gray'/(module.replace('.', '/') + '.py')).read_text())
    for n in tree.body:
        if isinstance(n, ast.Assign) and any(getattr(t, 'id', None) == '__all__' for t in n.targets): return ast.literal_eval(n.value)
    return []

def missing_examples(nb:Path, names:list[str]|None=None) -> list[str]:
    "The public functions and classes of `nb`'s module (or `names`) that no shown code cell with outputs uses"
    cells = json.loads(Path(nb).read_text())['cells']
    module = module_of(cells)
    if names is None:
        if module is None or module in NOT_PAGES: return []
        names = public_names(module)
    shown = [''.join(c['source']) for c in cells
             if c['cell_type'] == 'code' and c.get('outputs') and not _directives(''.join(c['source'])) & set(HIDDEN)]
    return [name for name in names if not name.isupper()
            and not any(re.search(rf'(?<![\w.]){re.escape(name)}\b', s) for s in shown)]

def module_notebooks() -> list[Path]: return sorted((ROOT/'nbs').glob('[0-9]*.ipynb'))

if __name__ == '__main__':
    nbs = [Path(a) for a in sys.argv[1:]] or module_notebooks()
    bad = {nb.name: m for nb in nbs if (m := missing_examples(nb))}
    for name, missing in bad.items(): print(f'{name}: no shown example with output for {", ".join(missing)}')
    sys.exit(1 if bad else 0)
