"""The benchmark by its role: it stays out of `import fastai_gray`'s path, a missing scikit-image names the `bench` extra,
the committed results (nbs/bench/) are made from their results.json, and every figure the docs quote from a run is
checked against results.json (README.md and the landing page make theirs from it: tools/docs.py's `bench_summary`)."""
import ast, importlib, json, re, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB, BENCH = ROOT/'fastai_gray', ROOT/'nbs'/'bench'


def _module_imports(path:Path) -> set:
    "The modules a file imports when it is imported: its imports outside function bodies, relative ones made absolute"
    found = set()
    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)): continue
            if isinstance(child, ast.Import): found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = ('fastai_gray.' if child.level else '') + (child.module or '')
                found.add(base.rstrip('.'))
                found.update(f'{base}.{a.name}'.replace('..', '.') for a in child.names if child.module is None)
            visit(child)
    visit(ast.parse(path.read_text()))
    return found

def test_the_package_does_not_import_the_benchmark():
    "No module of the library (outside fastai_gray/bench/) imports the benchmark or scikit-image when it is imported (the CLI imports bench lazily)"
    bad = {}
    for py in sorted(LIB.glob('*.py')):
        mods = {m for m in _module_imports(py) if m == 'fastai_gray.bench' or m.startswith(('fastai_gray.bench.', 'skimage'))}
        if mods: bad[py.name] = sorted(mods)
    assert not bad, f'modules that import the benchmark or its extra: {bad}'
    assert 'skimage.data' in _module_imports(LIB/'bench'/'data.py')

def test_benchmark_modules_are_small():
    "One theme a module: no module of the library or the benchmark is over 450 lines (nbdev's index aside)"
    big = {p.relative_to(LIB).as_posix(): n for p in LIB.rglob('*.py') if p.name != '_modidx.py' and (n := len(p.read_text().splitlines())) > 450}
    assert not big, big

def test_missing_scikit_image_names_the_extra(without_scikit_image):
    with pytest.raises(ImportError, match=re.escape('pip install "fastai_gray[bench]"')) as e:
        importlib.import_module('fastai_gray.bench')
    assert isinstance(e.value, ModuleNotFoundError) and e.value.name == 'skimage'

@pytest.fixture(scope='module')
def res(): return json.loads((BENCH/'results.json').read_text())

def test_committed_results_are_made_from_results_json(res):
    "results.md is `results_markdown` of results.json (rerun `make bench` rather than edit either), its plots exist"
    from fastai_gray.bench import results_markdown, STAGES
    assert res['mode'] == 'full' and set(STAGES) <= res.keys(), 'nbs/bench/ holds a full run of every stage'
    later = {s: res[s]['run']['mode'] for s in STAGES if 'run' in res[s]}
    assert set(later.values()) <= {'full'}, f'stages merged into nbs/bench/ from runs not in full mode: {later}'
    assert (BENCH/'results.md').read_text() == results_markdown(res)
    assert res['plots'] and all((BENCH/p).is_file() for p in res['plots'])

def test_readme_quotes_results_json(res):
    "README.md's benchmark lines are tools/docs.py's `bench_summary` of results.json (test_docs checks README.md is rendered)"
    sys.path.insert(0, str(ROOT/'tools'))
    try: import docs as docs_tool
    finally: sys.path.pop(0)
    summary = docs_tool.bench_summary(res)
    assert summary in (ROOT/'README.md').read_text()
    assert f"took {res['wall_s'] / 60:.0f} minutes" in summary and f"{res['accuracy']['summary']['exact']['mean']:.1%}" in summary

def _ratio(table, source, pipeline): return table[source][pipeline]['median'] / table[source]['rgb']['median']

def quoted_figures(res:dict) -> dict:
    "What nbs/06_bench.ipynb's prose says about the latest full run, made from its results.json: `{what: text}`"
    d, e, a = res['data'], res['e2e']['results'], res['accuracy']
    e2e = lambda p, task: e[p][task + '_stats']['median'] / e['rgb'][task + '_stats']['median']
    model = lambda p: e[p]['preds_stats']['median'] - e[p]['preds_data_stats']['median']
    acc, seg, cost, onnx = a['summary'], res['segment']['summary'], res['segment']['cost']['results'], res['onnx']['results']
    seg_ratio = cost['exact']['train_stats']['median'] / cost['rgb']['train_stats']['median']
    return {
        'duration': f"{res['wall_s'] / 60:.0f} minutes on 2 idle cores",
        'data path, augmented': f"({_ratio(d['results'], 'jpeg-L', 'gray-draft'):.2f}x for gray JPEGs and "
                                f"{_ratio(d['results'], 'jpeg-RGB', 'gray-draft'):.2f}x for color ones in the latest run",
        'data path, without aug': f"`gray-draft` is {_ratio(d['no_aug'], 'jpeg-L', 'gray-draft'):.2f}x and "
                                  f"{_ratio(d['no_aug'], 'jpeg-RGB', 'gray-draft'):.2f}x",
        'data path, PNG': f"{min(_ratio(d['results'], s, 'gray') for s in ('png-L', 'png-RGB')):.2f}x to "
                          f"{max(_ratio(d['results'], s, 'gray') for s in ('png-L', 'png-RGB')):.2f}x in the latest run",
        'training epoch': f"({e2e('gray', 'train'):.2f} and {e2e('gray-draft', 'train'):.2f} in the latest run)",
        'get_preds': f"({e2e('gray', 'preds'):.2f} for `gray` and {e2e('gray-draft', 'preds'):.2f} for `gray-draft` in the latest)",
        'batches': f"({e['gray-draft']['preds_data_stats']['median']:.2f} against {e['gray']['preds_data_stats']['median']:.2f} s)",
        'model part': f"its model part was {model('gray-draft') - model('gray'):.2f} s slower",
        'runs': f"in every one of {res['e2e']['reps']} runs",
        'batch size': f"({e['gray']['batch_bytes'] / 2**20:.1f} against {e['rgb']['batch_bytes'] / 2**20:.1f} MB)",
        'accuracy settings': f"(all {a['n_train'] + a['n_valid']} digits at {a['size']} px, `fine_tune({a['epochs']})`, "
                             f"{len(a['seeds'])} seeds; {sum(r['seconds'] for r in a['runs']) / 60:.0f} minutes on the idle machine)",
        'accuracy': ', '.join(f"{w} {acc[k]['mean']:.1%} ± {acc[k]['sd']:.1%}" for k, w in
                              (('exact', '`exact`'), ('sum', '`sum`'), ('rgb', '`rgb`'), ('fastai', "fastai's `n_in=1`"))),
        'frozen epoch': '(and after the frozen epoch ' + ', '.join(f"{acc[k]['epoch0_mean']:.1%}" for k in ('exact', 'sum', 'rgb'))
                        + f" and {acc['fastai']['epoch0_mean']:.1%})",
        'segment Dice': ', '.join(f"{w} {seg[k]['mean']:.3f} ± {seg[k]['sd']:.3f}" for k, w in
                                  (('exact', '`exact`'), ('sum', '`sum`'), ('rgb', '`rgb`'), ('fastai', "fastai's recipe"))),
        'segment cost': f"{seg_ratio:.2f} of the 3-channel one's ({cost['exact']['train_stats']['median']:.1f} against "
                        f"{cost['rgb']['train_stats']['median']:.1f} s)",
        'segment memory': f"{cost['exact']['peak_over_ready_mb']:.0f} against {cost['rgb']['peak_over_ready_mb']:.0f} MB",
        'onnx speed': ' and '.join(f"{o['speedup']:.2f}x at batch {o['batch']}" for o in onnx),
        'onnx difference': f"{max(o['max_rel_diff'] for o in onnx):.0e}",
    }

def test_bench_page_quotes_results_json(res):
    "Each figure nbs/06_bench.ipynb's prose quotes from the latest run is what results.json says (after `make bench`, update them)"
    nb = json.loads((ROOT/'nbs'/'06_bench.ipynb').read_text())
    prose = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    missing = {what: text for what, text in quoted_figures(res).items() if text not in prose}
    assert not missing, f'nbs/06_bench.ipynb does not say what nbs/bench/results.json does: {json.dumps(missing, indent=1)}'

def test_makefile_states_the_full_run_duration(res):
    help_line = next(l for l in (ROOT/'Makefile').read_text().splitlines() if l.startswith('bench:'))
    assert f"({res['wall_s'] / 60:.0f} minutes on 2 idle cores)" in help_line, help_line

def _fake_stage(stage:str) -> dict:
    "Tiny results of `stage` in the form `run_stages` gives, for the tests that need no training"
    cost = lambda s: dict(train=[s], train_data=[.1], train_stats=dict(median=s, min=s, max=s), train_data_stats=dict(median=.1, min=.1, max=.1),
                          peak_rss_mb=1000., rss_ready_mb=900., peak_over_ready_mb=100., batch_bytes=2**20, batch_shape=[8, 1, 256, 256])
    summ = lambda d: dict(mean=d, sd=0., epoch0_mean=d, epoch0_sd=0., per_seed=[d], per_seed_epoch0=[d], seconds=1.)
    if stage == 'segment':
        return dict(size=32, epochs=1, lr=1e-2, bs=4, seeds=[0], n_train=16, n_valid=4, runs=[],
                    summary={w: summ(d) for w, d in (('rgb', .5), ('fastai', .4), ('sum', .55), ('exact', .6))},
                    cost=dict(px=256, bs=8, reps=1, n_train=24, results={'rgb': cost(2.), 'exact': cost(1.5)}))
    row = dict(batch=1, px=224, threads=1, images=32, torch_img_s=10., onnxruntime_img_s=20., speedup=2., max_rel_diff=1e-6,
               torch=dict(median=10., min=9., max=11.), onnxruntime=dict(median=20., min=19., max=21.))
    return dict(px=224, threads=1, runs=1, min_images=32, n_out=10, results=[row])

def test_merge_into_keeps_the_other_stages(res, tmp_path, monkeypatch):
    "`--only segment onnx --merge-into DIR` replaces those stages of DIR/results.json, keeps the rest and its own run, names each run"
    import fastai_gray.bench as bench
    (tmp_path/'results.json').write_text(json.dumps(res))
    monkeypatch.setattr(bench, 'run_stages', lambda stages, cfg, work, source: {s: _fake_stage(s) for s in stages})
    assert bench.main(['--only', 'segment', 'onnx', '--merge-into', str(tmp_path), '--threads', '0']) == 0
    new = json.loads((tmp_path/'results.json').read_text())
    for k in res.keys() - {'segment', 'onnx', 'plots'}: assert new[k] == res[k], k
    for s in ('segment', 'onnx'):
        run = new[s]['run']
        assert run['command'] == f'fastai-gray bench --only segment onnx --merge-into {tmp_path} --threads 0' and run['mode'] == 'full'
        assert run['machine']['date'] != res['machine']['date'] and len(run['load_avg_end']) == 3
    md = (tmp_path/'results.md').read_text()
    assert md == bench.results_markdown(new) and md.count('Added by `fastai-gray bench --only segment onnx') == 2
    assert 'stages added by later runs, named in their sections: segment, onnx' in md
    assert '| segment: exact Dice >= 3-channel baseline | 0.600 vs 0.500 | yes |' in md
    assert '| onnx, batch 1: ONNX Runtime >= 1.5x PyTorch images/s | 2.00x (20.0 vs 10.0 img/s) | yes |' in md
    assert 'segment.png' in new['plots'] and all((tmp_path/p).is_file() for p in new['plots'])

def test_merge_into_needs_a_results_file(tmp_path):
    from fastai_gray.bench import main, merge_results
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path/'results.json'} does not exist")):
        main(['--only', 'onnx', '--merge-into', str(tmp_path)])
    (tmp_path/'results.json').write_text('{')
    with pytest.raises(SystemExit, match='is not JSON'): main(['--only', 'onnx', '--merge-into', str(tmp_path)])
    with pytest.raises(SystemExit, match='not both'): main(['--only', 'onnx', '--merge-into', str(tmp_path), '--out', str(tmp_path)])
    with pytest.raises(ValueError, match='no segment stage'): merge_results({}, {'onnx': {}}, ['segment'])

def _structure(v):
    "The keys of `v` at every level (a list: its first item's), without the `run` a stage records of the run it comes from"
    if isinstance(v, dict): return {k: _structure(o) for k, o in v.items() if k != 'run'}
    if isinstance(v, list) and v and isinstance(v[0], (dict, list)): return [_structure(v[0])]
    return type(v).__name__ if isinstance(v, (dict, list)) else None

def test_stage_registry_is_results_json(res):
    "`STAGES` names results.json's stages in its order; a full run's settings are those results.json records"
    from fastai_gray.bench import STAGES, Stage, stage_settings
    assert [k for k in res if k in STAGES] == list(STAGES) and all(isinstance(s, Stage) for s in STAGES.values())
    assert res.keys() - STAGES.keys() == {'command', 'argv', 'mode', 'settings', 'machine', 'wall_s', 'load_avg_end', 'plots'}
    full = json.loads(json.dumps(stage_settings('full')))  # the run's settings predate the segment and onnx stages (merged in later)
    assert {k: full[k] for k in res['settings']} == res['settings'] and {k: full[k] for k in res['segment']['run']['settings']} == res['segment']['run']['settings']

def test_a_run_writes_the_keys_of_results_json(res, tmp_path, monkeypatch):
    "`main` over every stage (the stages' results taken from results.json, not measured) writes results.json with its keys at every level"
    import fastai_gray.bench as bench
    monkeypatch.setattr(bench, 'run_stages', lambda stages, cfg, work, source: {s: {k: v for k, v in res[s].items() if k != 'run'} for s in stages})
    assert bench.main(['--out', str(tmp_path)]) == 0
    new = json.loads((tmp_path/'results.json').read_text())
    assert _structure(new).keys() == _structure(res).keys() and res['settings'].keys() <= new['settings'].keys()  # see above
    assert {k: v for k, v in _structure(new).items() if k != 'settings'} == {k: v for k, v in _structure(res).items() if k != 'settings'}
    assert all(new[s]['run']['command'] == f'fastai-gray bench --out {tmp_path}' for s in bench.STAGES)
    same = lambda md: re.sub(r'Added by `[^\n]*\n\n', '', md.split('## Targets')[1])  # the tables, without the merged stages' runs
    assert same((tmp_path/'results.md').read_text()) == same((BENCH/'results.md').read_text())

def test_only_and_merge_into_parse():
    from fastai_gray.bench import _parser, STAGES
    args = _parser().parse_args(['--quick', '--only', 'segment', 'onnx', '--merge-into', 'nbs/bench'])
    assert (args.quick, args.only, args.merge_into, args.out) == (True, ['segment', 'onnx'], Path('nbs/bench'), None)
    assert _parser().parse_args(['--only', *STAGES]).only == list(STAGES)
    with pytest.raises(SystemExit): _parser().parse_args(['--only', 'nothing'])

@pytest.mark.slow
def test_a_quick_run_of_one_stage(res, tmp_path, capsys):
    "`fastai-gray bench --quick --only fidelity` measures (half a minute) and writes results.json with the keys of the committed one"
    from fastai_gray.cli import main as cli
    assert cli(['bench', '--quick', '--only', 'fidelity', '--out', str(tmp_path)]) == 0
    new = json.loads((tmp_path/'results.json').read_text())
    assert new.keys() == res.keys() - {'accuracy', 'data', 'e2e', 'segment', 'onnx', 'gpu', 'cache'}
    assert _structure(new['fidelity']) == _structure(res['fidelity']) and new['mode'] == 'quick' and new['plots'] == ['fidelity.png']
    assert new['fidelity']['results']['ImageNet']['exact']['agreement'] == 1.0
