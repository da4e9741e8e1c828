"""Build the docs site and README.md offline, with no Quarto: nbdev processes the notebooks, smalldocs renders them.

    python tools/docs.py build           # nbs/ -> _proc/ (nbdev's processing) -> _docs/ (smalldocs), 20 to 40 s
    python tools/docs.py readme          # nbs/index.ipynb -> README.md
    python tools/docs.py readme --check  # exit 1 when README.md is not what `readme` writes
    python tools/docs.py run NB.ipynb... # run notebooks and save them with their outputs (the tutorials' figures)

`make docs`, `make readme` and `make tutorials` run these. The steps of `build`:

1. `refresh_quarto_yml()` writes nbs/nbdev.yml from pyproject.toml (nbs/_quarto.yml is ours and stays);
2. nbdev's `proc_nbs` copies nbs/ to _proc/ and runs nbdev's notebook processors on every notebook: front matter from
   the title cell, a `show_doc` cell for every exported function and class, executed, hidden and exported cells
   removed, backticked names linked. Two changes: one more processor documents each exported constant (`LUMA_WEIGHTS`:
   a heading and its definition, since `show_doc` is for functions and classes), and we run only the *imports* of a
   cell that mixes imports with other code (nbdev runs the whole cell, and warns about it): such cells are tests and
   examples, whose names `show_doc` never needs;
3. each notebook is named as nbdev names its page (`02_stem.ipynb` -> `stem.ipynb`, nbdev's `output-file`, which
   smalldocs does not read), links follow; the links nbdev writes to this site's published address become links from
   the site's root, so the offline site is whole; the landing page gets the headline figures of nbs/bench/results.json
   (`bench_summary`) and nbs/bench/results.md (the benchmark's tables and plots) when those files exist;
4. `nbdev_sidebar` lists the notebooks (nothing else: no nbdev.yml, no styles.css); we group them as Tutorials and
   Reference and write _proc/sidebar.yml;
5. smalldocs (pure Python, reads _quarto.yml like Quarto) renders _proc/ into _docs/. A broken link fails the build;
6. the site is made self-contained: maths as MathML (smalldocs would load KaTeX from a CDN), the theme without its
   Google Fonts import. Nothing is fetched from outside the site: it works offline, as the browser test checks.
"""
from __future__ import annotations
import argparse, ast, contextlib, html, io, json, os, posixpath, re, shutil, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS, PROC, DOCS = ROOT/'nbs', ROOT/'_proc', ROOT/'_docs'
BENCH, BENCH_JSON = NBS/'bench'/'results.md', NBS/'bench'/'results.json'
BENCH_MARK = '<!-- bench-results -->'  # where nbs/index.ipynb's markdown has this, the benchmark's results go
SUMMARY_MARK = '<!-- bench-summary -->'  # and here, on the site and in README.md, their headline figures (`bench_summary`)
DOCS_URL = 'https://fastai-gray.github.io/fastai_gray/'  # the published site: pyproject's Documentation, nbdev's doc_host + doc_baseurl


# ---------------------------------------------------------------------------------------------------- nbdev's processing

def _imports_only(src:str) -> str|None:
    "The top-level import statements of `src` when it also holds other code, else None"
    try: tree = ast.parse('\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!'))))
    except SyntaxError: return None
    imps = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if not imps or len(imps) == len(tree.body): return None
    return '\n'.join(ast.unparse(n) for n in imps)

def _patch_exec_show_docs():
    "Make nbdev's `exec_show_docs` run only the imports of a cell that mixes imports with other code"
    from nbdev import processors
    from fastcore.basics import str2bool
    def __call__(self, cell):
        if not self.nb.has_docs_ or not hasattr(self, 'k'): return
        fm = getattr(self.nb, 'frontmatter_', {})
        if str2bool(fm.get('skip_showdoc', False)): return
        if not processors._do_eval(cell): return
        imps = None if cell.directives_.keys() & {'export', 'exports', 'exporti', 'exec_doc'} else _imports_only(cell.source)
        if imps is None: self.k.cell(cell)
        else: self.k.run(imps)
        if (e := self.k.exc):
            raise Exception(f"Error in notebook {fm.get('title', '')!r}, cell {cell.idx_}:\n{cell.source}\n{type(e).__name__}: {e}") from e
    processors.exec_show_docs.__call__ = __call__

def _assigned(target):
    "The names a target of an assignment binds: `A`, `A, B`, `[A, *B]`; not `a.b` or `a[0]`"
    if isinstance(target, ast.Name): yield target
    elif isinstance(target, ast.Starred): yield from _assigned(target.value)
    elif isinstance(target, (ast.Tuple, ast.List)):
        for t in target.elts: yield from _assigned(t)

def _doc_constants_proc():
    "An nbdev processor that documents each exported constant (`LUMA_WEIGHTS = ...`): a heading and its definition"
    from nbdev.process import Processor, mk_cell
    from nbdev.processors import _want_doc
    class doc_constants(Processor):
        "Add a markdown cell after each exported cell for the public names it assigns, as `show_doc` does for functions"
        def begin(self):
            cells = self.nb.cells
            for i in reversed(range(len(cells))):
                if not _want_doc(cells[i]): continue
                src = '\n'.join(l for l in cells[i].source.splitlines() if not l.startswith('#|'))
                try: tree = ast.parse(src)
                except SyntaxError: continue
                docs = []
                for node in tree.body:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
                    names = [n.id for t in targets for n in _assigned(t)]  # `A = 1`, and `A, B = 1, 2` too
                    for name in (n for n in names if not n.startswith('_')):
                        docs.append(f'### {name}\n\n```python\n{ast.get_source_segment(src, node)}\n```')
                for doc in reversed(docs): cells.insert(i + 1, mk_cell(doc, cell_type='markdown'))
    return doc_constants

def process_notebooks() -> Path:
    "nbdev's processing of every notebook in nbs/ into a fresh _proc/"
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import proc_nbs
    os.chdir(ROOT)
    refresh_quarto_yml()
    _patch_exec_show_docs()
    from nbdev.processors import FilterDefaults, rm_export
    base_procs, doc_constants = FilterDefaults.base_procs, _doc_constants_proc()
    def procs(self):
        res = base_procs(self)
        return res[:res.index(rm_export)] + [doc_constants] + res[res.index(rm_export):]
    FilterDefaults.base_procs = procs
    shutil.rmtree(PROC, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Found cells containing imports')
        proc_nbs(str(NBS), n_workers=0, file_glob='*.ipynb')  # in this process: fastai is imported once
    return PROC


# ---------------------------------------------------------------------------------------------------- our steps

def _cells_md(nb:dict):
    "Every piece of Markdown in a notebook: the markdown cells, and the text/markdown outputs (show_doc's)"
    for c in nb['cells']:
        if c['cell_type'] == 'markdown': yield c, 'source', c
        for o in c.get('outputs', []):
            if 'text/markdown' in o.get('data', {}): yield c, 'text/markdown', o['data']

def _join(s): return ''.join(s) if isinstance(s, list) else s

def local_links(nb:dict, src:str, renames:dict) -> dict:
    """Links to the published site (`DOCS_URL...`) made links from the site's root (`/...`), so the offline site is whole;
    links to a notebook that `renames` renames (`02_stem.ipynb` -> `stem.ipynb`) follow it"""
    folder = posixpath.dirname(src)
    def follow(m):
        path, hash_, frag = m.group(2).partition('#')
        if re.match(r'[a-z]+:|/', path) or not path.endswith('.ipynb'): return m.group(0)
        joined = posixpath.normpath(posixpath.join(folder, path))
        if joined not in renames: return m.group(0)
        return m.group(1) + posixpath.relpath(renames[joined], folder or '.') + hash_ + frag + ')'
    for _, key, holder in _cells_md(nb):
        md = re.sub(r'\]\(' + re.escape(DOCS_URL), '](/', _join(holder[key]))
        holder[key] = re.sub(r'(\]\()([^)\s]+)\)', follow, md)
    return nb

def bench_markdown(prefix:str='bench/') -> str|None:
    "nbs/bench/results.md without its title, headings one level down, relative links and images from nbs/; None if missing"
    if not BENCH.exists(): return None
    md = re.sub(r'\A\s*# [^\n]*\n', '', BENCH.read_text())  # the landing page's "## Benchmark" is its title
    md = re.sub(r'^(#{1,5}) ', r'#\1 ', md, flags=re.M)
    md = re.sub(r'(!?\[[^\]]*\]\()(?![a-z]+:|/|#)', r'\1' + prefix, md)
    md = re.sub(r'(<img[^>]*\bsrc=")(?![a-z]+:|/)', r'\1' + prefix, md)
    return md

# the words for the learners of the benchmark's accuracy stage
LEARNERS = {'exact': '`exact`', 'sum': '`sum`', 'rgb': 'the 3-channel baseline', 'fastai': "fastai's `n_in=1`"}

def _ratios(table:dict, sources) -> list:
    "For each of `sources` in a data-path table: gray images/s over rgb's (`gray-draft` for JPEGs, `gray` for PNGs)"
    return [table[s]['gray-draft' if s.startswith('jpeg') else 'gray']['median'] / table[s]['rgb']['median'] for s in sources]

def _span(vs, fmt='{:.2f}') -> str:
    "`0.85 to 0.92`, or one value when all round the same"
    lo, hi = fmt.format(min(vs)), fmt.format(max(vs))
    return lo if lo == hi else f'{lo} to {hi}'

def bench_summary(res:dict) -> str:
    """The headline figures of a benchmark run (`fastai-gray bench`'s results.json): its date, machine and duration, and one
    line per stage it ran, in Markdown. Every number comes from `res`; the landing page and README.md show this."""
    m, out = res['machine'], []
    threads = f"{m['torch_threads']} torch thread{'s' * (m['torch_threads'] != 1)}"
    out.append(f"Its latest {res['mode']} run, on {m['date'][:10]} on a {m['cores']}-core {m['cpu']} ({threads}, load average "
               f"{m['load_avg'][0]:.1f} at the start), took {res['wall_s'] / 60:.0f} minutes:\n")
    if 'fidelity' in res:
        f = res['fidelity']
        stats = 'ImageNet' if 'ImageNet' in f['results'] else next(iter(f['results']))
        fid = f['results'][stats]
        line = (f"- **Fidelity**, {f['n']} gray {f['size']}-px crops of scikit-image's photos, {stats} statistics: the exact stem "
                f"agrees with the 3-channel model on the gray copied to 3 channels on {fid['exact']['agreement']:.1%} of top-1 classes "
                f"(largest relative logit error {fid['exact']['max_error']:.1e})")
        if 'sum' in fid: line += f"; the summed stem with gray normalization on {fid['sum']['agreement']:.1%}"
        if 'fastai' in fid: line += f", fastai's recipe on {fid['fastai']['agreement']:.1%}"
        out.append(line + '.')
    if 'accuracy' in res:
        a, summ = res['accuracy'], res['accuracy']['summary']
        out.append(f"- **Accuracy**, scikit-learn's digits at {a['size']} px, `fine_tune({a['epochs']})`, {len(a['seeds'])} "
                   f"seed{'s' * (len(a['seeds']) != 1)}, mean ± standard deviation: "
                   + ', '.join(f"{LEARNERS.get(w, w)} {summ[w]['mean']:.1%} ± {summ[w]['sd']:.1%}"
                               for w in sorted(summ, key=lambda w: -summ[w]['mean'])) + '.')
    if 'data' in res:
        d = res['data']
        table, plain = d['results'], d.get('no_aug', {})
        jpegs = [(s, k) for s, k in (('jpeg-L', 'gray JPEG'), ('jpeg-RGB', 'color JPEG')) if s in table]
        pngs = [s for s in table if s.startswith('png')]
        parts = []
        if jpegs:
            part = ("the gray pipeline with `draft` makes " + ' and '.join(f'{r:.2f}x ({k})' for r, (_, k) in
                    zip(_ratios(table, [s for s, _ in jpegs]), jpegs)) + " the images per second of fastai's 3-channel one")
            if all(s in plain for s, _ in jpegs):
                part += ', ' + ' and '.join(f'{r:.2f}x' for r in _ratios(plain, [s for s, _ in jpegs])) + ' without augmentation'
            parts.append(part)
        if pngs: parts.append(f"PNG {_span(_ratios(table, pngs), '{:.2f}x')}")
        first = next(iter(table.values()))
        parts.append(f"{first['gray']['batch_bytes'] / first['rgb']['batch_bytes']:.2f} of the bytes per batch")
        out.append(f"- **Data path**, {d['source_size']}-px files to augmented {d['size']}-px batches: " + '; '.join(parts) + '.')
    if 'e2e' in res:
        e = res['e2e']
        runs, base = e['results'], e['results']['rgb']
        gray = [p for p in runs if p != 'rgb']
        ratio = lambda task: _span([runs[p][task + '_stats']['median'] / base[task + '_stats']['median'] for p in gray])
        batches = max(v['train_data_stats']['median'] / v['train_stats']['median'] for v in runs.values())
        out.append(f"- **End to end**, Lite0 at {e['size']} px on the CPU: a training epoch takes {ratio('train')} of the 3-channel "
                   f"time and `get_preds` {ratio('preds')}; making the batches is at most {batches:.0%} of a training epoch, the rest "
                   "is the model.")
    def later(stage):
        "` (run on DATE, load average L)` for a stage another run merged in (`fastai-gray bench --merge-into`)"
        r = res[stage].get('run')
        if not r or r['machine']['date'] == m['date']: return ''
        return f" ({r['mode']} run on {r['machine']['date'][:10]}, load average {r['machine']['load_avg'][0]:.1f} at the start)"
    if 'segment' in res:
        s, summ = res['segment'], res['segment']['summary']
        line = (f"- **Segmentation**{later('segment')}, U-Nets on Lite0, digits on noisy backgrounds at {s['size']} px, `fine_tune({s['epochs']})`, "
                f"{len(s['seeds'])} seed{'s' * (len(s['seeds']) != 1)}, Dice mean ± standard deviation: "
                + ', '.join(f"{LEARNERS.get(w, w).replace('`n_in=1`', 'recipe')} {summ[w]['mean']:.3f} ± {summ[w]['sd']:.3f}"
                            for w in sorted(summ, key=lambda w: -summ[w]['mean'])))
        c = s.get('cost')
        if c and {'rgb', 'exact'} <= c['results'].keys():
            g, b = c['results']['exact'], c['results']['rgb']
            line += (f"; at {c['px']} px the 1-channel training epoch takes {g['train_stats']['median'] / b['train_stats']['median']:.2f} "
                     f"of the 3-channel time, peak memory {g['peak_rss_mb']:.0f} against {b['peak_rss_mb']:.0f} MB")
        out.append(line + '.')
    if 'onnx' in res:
        o = res['onnx']
        out.append(f"- **ONNX Runtime**{later('onnx')} against PyTorch on the CPU, Lite0 at {o['px']} px, {o['threads']} "
                   f"thread{'s' * (o['threads'] != 1)}: " + ', '.join(f"{r['speedup']:.2f}x the images per second at batch {r['batch']}"
                                                                    for r in o['results'])
                   + f", outputs equal to {max(r['max_rel_diff'] for r in o['results']):.0e} (relative).")
    if 'gpu' in res:
        g = res['gpu']
        if 'speed' in g:
            out.append(f"- **GPU**{later('gpu')}, {g['device']}, forward and backward under {g['dtype']} autocast, batch {g['bs']} at "
                       f"{g['px']} px: the exact stem's fused form runs at " + ', '.join(f"{r['exact fused']['ratio']:.2f} ({arch})"
                                                                                         for arch, r in g['speed'].items())
                       + " of the 3-channel model's images per second.")
        else: out.append(f"- **GPU**{later('gpu')}: not measured (the run had no CUDA device; `fastai-gray bench --only gpu` on a machine with one).")
    if 'cache' in res:
        c = res['cache']
        ld, ep, acc = c['loading'], c['epoch']['results'], c['accuracy']
        out.append(f"- **Gray cache**{later('cache')}, {c['source_size']}-px files cached at {c['size']} px: training batches at "
                   f"{ld['cache']['median'] / ld['gray']['median']:.1f}x the images per second of the gray file pipeline and "
                   f"{ld['cache']['median'] / ld['rgb']['median']:.1f}x fastai's 3-channel one on one core; built at "
                   f"{_span([v['median'] for v in c['build'].values()], '{:.0f}')} images per second from JPEG, PNG and 16-bit PNG "
                   f"({c['cores']} processes); making batches is {ep['cache']['data_share']:.1%} of a CPU training epoch from the cache "
                   f"against {ep['files']['data_share']:.1%} from files; digits accuracy {acc['cache']['mean']:.1%} from the cache and "
                   f"{acc['files']['mean']:.1%} from the files, same split and seeds.")
    return '\n'.join(out)

def bench_summary_markdown() -> str:
    "`bench_summary` of nbs/bench/results.json, or a note saying how to make it"
    if not BENCH_JSON.exists():
        return ('*The headline figures of the benchmark appear here once `nbs/bench/results.json` exists: run `make bench` '
                '(`fastai-gray bench`).*')
    return bench_summary(json.loads(BENCH_JSON.read_text()))

def bench_fallback() -> str:
    return ('*The benchmark\'s numbers and figures appear here once `nbs/bench/results.md` exists: run `make bench` '
            '(`fastai-gray bench`), then `make docs`.*')

def output_file(nb:dict) -> str|None:
    "The `output-file` nbdev puts in a notebook's front matter (`02_stem.ipynb` -> `stem.html`)"
    c = nb['cells'][0] if nb['cells'] else None
    m = c and re.search(r'^output-file:\s*(\S+)\s*$', _join(c['source']), re.M)
    return m.group(1) if m else None

def landing_page(nb:dict) -> dict:
    "Put the benchmark's results (or a note saying where they will be) in the landing page's marked cell"
    for c in nb['cells']:
        src = _join(c['source'])
        if c['cell_type'] == 'markdown' and (BENCH_MARK in src or SUMMARY_MARK in src):
            c['source'] = src.replace(SUMMARY_MARK, bench_summary_markdown()).replace(BENCH_MARK, bench_markdown() or bench_fallback())
    return nb

def sidebar_yml(renames:dict) -> str:
    "nbdev's sidebar of the notebooks, grouped: the landing page, one section per folder (Tutorials), Reference (the modules)"
    import yaml
    from nbdev.quarto import nbdev_sidebar
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): nbdev_sidebar.__wrapped__(path=str(NBS), printit=True, force=True)
    def rename(o):
        if isinstance(o, str): return renames.get(o, o)
        return {**o, 'contents': [rename(c) for c in o['contents']]}
    items = [rename(o) for o in yaml.safe_load(buf.getvalue())['website']['sidebar']['contents']]
    pages = [o for o in items if isinstance(o, str)]
    home = [p for p in pages if Path(p).stem == 'index']
    folders = [{**o, 'section': o['section'].replace('_', ' ').capitalize()} for o in items if isinstance(o, dict)]
    contents = home + folders + [{'section': 'Reference', 'contents': [p for p in pages if p not in home]}]
    return yaml.dump({'website': {'sidebar': {'contents': contents}}}, sort_keys=False)

_MATH = re.compile(r'<span class="math (inline|display)">\\[(\[](.*?)\\[)\]]</span>', re.S)
_KATEX = re.compile(r'<(?:link|script)\b[^>]*https://cdn\.jsdelivr\.net/npm/katex@[^>]*>(?:</script>)?\s*')
_WEB_FONTS = re.compile(r'@import url\([\'"]?https?://[^)]*\);?')

def self_contained(site:Path):
    """Make local what smalldocs would fetch from the internet: maths becomes MathML, which browsers draw themselves,
    in place of KaTeX from a CDN; the theme's Google Fonts import goes, leaving its system-font fallbacks"""
    from latex2mathml.converter import convert
    def mathml(m):
        tex = html.unescape(m.group(2))
        try: return f'<span class="math {m.group(1)}">{convert(tex, display="block" if m.group(1) == "display" else "inline")}</span>'
        except Exception as e:
            print(f'docs: maths {tex!r} not converted ({e}); shown as TeX', file=sys.stderr)
            return f'<code class="math {m.group(1)}">{html.escape(tex)}</code>'
    for page in site.rglob('*.html'):
        text = page.read_text()
        new = _KATEX.sub('', _MATH.sub(mathml, text))
        if new != text: page.write_text(new)
    for css in (site/'site_libs').rglob('*.css'):
        text = css.read_text()
        if _WEB_FONTS.search(text): css.write_text(_WEB_FONTS.sub('', text))

def render_site() -> float:
    "Render _proc/ with smalldocs into _docs/; returns the seconds it took"
    from smalldocs.site import build
    t0 = time.time()
    out = PROC/'_docs'
    site = build(PROC, quiet=True)
    if site.out != out: raise RuntimeError(f'smalldocs wrote to {site.out}, not {out}: check nbs/nbdev.yml')
    expected = re.compile(r'executable cell\(s\) shown but not run|unknown key format-links|output-file is not read')
    for w in site.warnings:
        if not expected.search(w): print(f'smalldocs: {w}', file=sys.stderr)
    broken = [w for w in site.warnings if 'broken link' in w]
    if broken: raise SystemExit(f'{len(broken)} broken link(s) in the docs: see above')
    self_contained(out)
    shutil.rmtree(DOCS, ignore_errors=True)
    shutil.move(str(out), str(DOCS))
    (DOCS/'.nojekyll').touch()
    return time.time() - t0

def build():
    t0 = time.time()
    process_notebooks()
    for run in (p for p in (PROC/'bench').glob('*') if p.is_dir()): shutil.rmtree(run)  # quick/, partial/: not the site's run
    t1 = time.time()
    # smalldocs names a page after its file and Quarto reads `output-file`: name each notebook as its page is named
    nbs = {f.relative_to(PROC).as_posix(): json.loads(f.read_text()) for f in sorted(PROC.rglob('*.ipynb'))}
    renames = {}
    for src, nb in nbs.items():
        out = output_file(nb)
        if out and Path(out).stem != Path(src).stem: renames[src] = posixpath.join(posixpath.dirname(src), Path(out).stem + '.ipynb')
    if len(set(renames.values())) < len(renames) or set(renames.values()) & (set(nbs) - set(renames)):
        raise SystemExit(f'two notebooks make the same page: {renames}')
    for src in nbs: (PROC/src).unlink()
    for src, nb in nbs.items():
        local_links(nb, src, renames)
        if src == 'index.ipynb': landing_page(nb)
        (PROC/renames.get(src, src)).write_text(json.dumps(nb, indent=1))
    (PROC/'sidebar.yml').write_text(sidebar_yml(renames))
    t2 = render_site()
    print(f'docs: {len(list(DOCS.rglob("*.html")))} pages in {DOCS.relative_to(ROOT)}/ '
          f'(nbdev processing {t1-t0:.0f}s, smalldocs {t2:.0f}s)')


# ---------------------------------------------------------------------------------------------------- README.md

def _directives(src:str) -> dict:
    "The `#| key: value` (or `#| key`) lines at the top of a code cell"
    out = {}
    for line in src.splitlines():
        if not line.startswith('#|'): break
        k, _, v = line[2:].strip().partition(':')
        out[k.strip()] = v.strip() or 'true'
    return out

def _shown(d:dict) -> bool:
    return not (d.keys() & {'hide', 'export', 'exporti', 'default_exp'}) and 'false' not in (d.get('include'), d.get('echo'))

def readme_markdown(index:Path=NBS/'index.ipynb') -> str:
    """README.md from the landing page, as `nbdev_readme` makes it with Quarto: its markdown cells, its shown code cells as
    Python blocks with their text outputs, links to other pages of the site made absolute, the benchmark's headline figures
    (`bench_summary` of nbs/bench/results.json: `make readme` after each `make bench`, which does it), and a link to its
    full results in place of them (the site shows them)"""
    nb = json.loads(index.read_text())
    parts = []
    for c in nb['cells']:
        src = _join(c['source']).strip('\n')
        if c['cell_type'] == 'markdown':
            if SUMMARY_MARK in src: src = src.replace(SUMMARY_MARK, bench_summary_markdown())
            if BENCH_MARK in src:
                src = src.replace(BENCH_MARK, 'The full tables and plots, with the command, machine and date of the run: '
                                  '[nbs/bench/results.md](nbs/bench/results.md) (`make bench` writes them; the docs site '
                                  'shows them on its landing page).')
            src = re.sub(r'\]\((?![a-z]+:|/|#)([^)\s]+\.html(?:#[^)\s]*)?)\)', lambda m: f']({DOCS_URL}{m.group(1)})', src)
            parts.append(src)
        elif c['cell_type'] == 'code':
            d = _directives(src)
            if not _shown(d): continue
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip('\n')
            if code: parts.append(f'```python\n{code}\n```')
            for o in c.get('outputs', []):
                text = _join(o.get('text', '')) if o.get('output_type') == 'stream' else _join(o.get('data', {}).get('text/plain', ''))
                if text.strip() and 'text/html' not in o.get('data', {}): parts.append(f'```\n{text.rstrip()}\n```')
    return '\n\n'.join(parts) + '\n'

def readme(check:bool=False) -> int:
    want, path = readme_markdown(), ROOT/'README.md'
    if check:
        if path.exists() and path.read_text() == want: return 0
        print('README.md is not what nbs/index.ipynb renders to: run `make readme`', file=sys.stderr)
        return 1
    path.write_text(want)
    print(f'wrote {path.relative_to(ROOT)}')
    return 0


# ---------------------------------------------------------------------------------------------------- outputs

def run_notebooks(paths:list) -> int:
    """Run each notebook top to bottom, each in a fresh shell, and save it with its outputs, which the site shows
    (smalldocs runs no code). A failing cell stops the run and leaves that notebook unchanged. Then run `nbdev-clean`."""
    from execnb.shell import CaptureShell
    from fastcore.nbio import read_nb, write_nb
    os.environ.setdefault('MPLBACKEND', 'Agg')
    for p in map(Path, paths):
        t0, shell, nb = time.time(), CaptureShell(mpl_format='png'), read_nb(p)
        shell.set_path(p.parent.resolve())
        # fastprogress's bars and metrics tables in HTML, as Jupyter shows them (in a plain shell it prints text bars)
        shell.run('import fastprogress.fastprogress as _fp\n_fp.master_bar, _fp.progress_bar = _fp.NBMasterBar, _fp.NBProgressBar')
        with contextlib.chdir(p.parent):
            for cell in nb.cells:
                shell.cell(cell, stderr=False)  # warnings are not part of the page
                if shell.exc:
                    print(shell.prettytb(fname=p), file=sys.stderr)
                    return 1
                if cell.cell_type == 'code': cell.outputs = [o for o in cell.outputs if _kept(o)]
        write_nb(nb, p)
        print(f'{p}: ran in {time.time()-t0:.0f}s, outputs saved')
    return 0

def _kept(out) -> bool:
    """Whether to keep an output: Jupyter replaces a progress display in place, execnb keeps each update; so drop the
    displays that still hold a `<progress>` bar, fastprogress's style sheet and emptied bars, and keep the final tables"""
    if out.get('output_type') != 'display_data': return True
    page = _join(out.get('data', {}).get('text/html', '')).strip()
    if not page: return 'text/html' not in out.get('data', {})
    return '<progress' not in page and not page.startswith('<style>')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('what', choices=['build', 'readme', 'run'])
    p.add_argument('notebooks', nargs='*', help='run: the notebooks to run')
    p.add_argument('--check', action='store_true', help='readme: exit 1 when README.md differs, write nothing')
    a = p.parse_args()
    if a.what == 'build': sys.exit(build())
    sys.exit(readme(a.check) if a.what == 'readme' else run_notebooks(a.notebooks))
