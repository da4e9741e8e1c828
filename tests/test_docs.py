"""The docs site, built offline and checked in a real browser; README.md made from the landing page.

The tests build the site as `make docs` does (`tools/docs.py build`: nbdev's processing, rendered by smalldocs), serve
`_docs/` on 127.0.0.1 and drive Debian's headless Chromium over the DevTools protocol. Every page must load with no
console error, no failed request and no request outside the site (it works offline), every internal link (anchors included) and every image must resolve, the sidebar must
list every notebook's page and nothing else, each module's page must hold a `show_doc` entry for each of its public
functions and classes, and the search box must find `gray_learner`. A screenshot of the landing page is saved as
`_docs/screenshot.png`.

The tests that need the browser are marked `browser`. Where Chromium is missing they are skipped before the site is
built, with the reason and how to install it (`apt-get install -y chromium` on Debian, or `$CHROMIUM` set to its path);
in CI (`CI=true`) a missing Chromium fails them instead (`.ci/run` installs it). The skip is tests/conftest.py's, and is
tested here. The README tests need no browser and always run, as does the check that every
module page shows an example, with its output, of each public function and class (tools/doc_audit.py). `make test-fast` leaves the browser tests out."""
import ast, base64, contextlib, functools, http.server, io, json, os, re, shutil, subprocess, sys, threading, time
import urllib.error, urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS, NBS, LIB = ROOT/'_docs', ROOT/'nbs', ROOT/'fastai_gray'
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run', '--hide-scrollbars',
                  '--disable-default-apps', '--mute-audio']

sys.path.insert(0, str(ROOT/'tools'))
import docs as docs_tool  # tools/docs.py: the build and the README rendering
import doc_audit  # tools/doc_audit.py: which public names a module page shows no example of
sys.path.pop(0)


# ---------------------------------------------------------------------------------------------------- README.md

def test_readme_is_index_rendered():
    "README.md is what `make readme` makes from nbs/index.ipynb: edit the notebook, then run `make readme`"
    want = docs_tool.readme_markdown()
    have = (ROOT/'README.md').read_text()
    assert have == want, 'README.md is not what nbs/index.ipynb renders to: run `make readme`'

def test_readme_keeps_the_two_commands():
    readme = (ROOT/'README.md').read_text()
    assert 'pip install -e ".[dev]" && fastai-gray train' in readme
    assert 'python -m pytest' in readme


# ---------------------------------------------------------------------------------------------------- the tier

def test_module_pages_show_an_example_of_every_public_name():
    "Each public function and class appears in a shown code cell with saved outputs on its module page (tools/doc_audit.py)"
    missing = {nb.name: m for nb in doc_audit.module_notebooks() if (m := doc_audit.missing_examples(nb))}
    assert not missing, f'no shown example with output (python tools/docs.py run NB saves outputs): {missing}'

DOCUMENTED_MODULES = ('core', 'dicom', 'data', 'masks', 'datasets', 'cache', 'stem', 'weights', 'learner', 'unet', 'explain', 'train', 'schema', 'safe', 'onnx',
                      'distributed', 'cli')  # the package's modules (bench is apart: a script with a page)

def _parameters_without_docments(module:str) -> dict:
    "`{name: [parameters]}` of the public functions and classes of fastai_gray.`module` whose parameters have no docment"
    import importlib, inspect
    from fastcore.docments import docments
    mod, res = importlib.import_module(f'fastai_gray.{module}'), {}
    for name in mod.__all__:
        obj = getattr(mod, name)
        if not callable(obj) or name.isupper(): continue
        f = obj.__init__ if inspect.isclass(obj) else obj
        if getattr(f, '__module__', None) != mod.__name__: continue  # a class without its own __init__ (fastai's, fasttransform's)
        docs = docments(f, full=False)
        params = [p for p, v in inspect.signature(f).parameters.items()
                  if p != 'self' and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
        if missing := [p for p in params if not docs.get(p)]: res[name] = missing
    return res

@pytest.mark.parametrize('module', DOCUMENTED_MODULES)
def test_public_parameters_have_docments(module):
    "Each parameter of a public function or class has a docment (fastcore's comment after it), which the docs show in a table"
    assert not (missing := _parameters_without_docments(module)), f'fastai_gray.{module}: parameters without a docment: {missing}'

def test_doc_audit_tells_an_example_from_a_check(tmp_path):
    "A name only in a hidden cell, an exported cell or a cell without outputs has no example; a shown cell with output is one"
    def cell(src, outputs=()): return dict(cell_type='code', source=src, outputs=list(outputs), metadata={}, execution_count=None)
    out = [dict(output_type='stream', name='stdout', text='3')]
    nb = tmp_path/'x.ipynb'
    nb.write_text(json.dumps(dict(cells=[cell('#| export\ndef shown(): ...\ndef hidden(): ...\ndef bare(): ...'),
                                         cell('shown()', out), cell('#| hide\nhidden()', out), cell('bare()'),
                                         cell('x.dotted()', out)], metadata={}, nbformat=4, nbformat_minor=5)))
    assert doc_audit.missing_examples(nb, ['shown', 'hidden', 'bare', 'dotted', 'CONSTANT']) == ['hidden', 'bare', 'dotted']

def test_browser_tests_skip_without_chromium_except_in_ci(pytester, monkeypatch):
    "Without Chromium a `browser` test is skipped, saying how to install it; with CI=true it fails (tests/conftest.py)"
    pytester.makeconftest((Path(__file__).parent/'conftest.py').read_text())
    pytester.makeini('[pytest]\naddopts = -rs\nmarkers =\n    browser: drives Chromium\n')
    pytester.makepyfile(test_site='import pytest\n\n@pytest.mark.browser\ndef test_site(chromium): pass\n\ndef test_other(): pass\n')
    monkeypatch.setenv('PATH', str(Path(sys.executable).parent))  # no Chromium on it
    monkeypatch.delenv('CHROMIUM', raising=False)
    monkeypatch.delenv('CI', raising=False)
    res = pytester.runpytest_subprocess()
    res.assert_outcomes(passed=1, skipped=1)
    res.stdout.fnmatch_lines(['*SKIPPED*Chromium is not installed (`apt-get install -y chromium` on Debian*'])
    monkeypatch.setenv('CI', 'true')
    res = pytester.runpytest_subprocess()
    res.assert_outcomes(passed=1, errors=1)
    res.stdout.fnmatch_lines(['*Chromium is not installed*in CI (CI=true) it must be*'])


# ---------------------------------------------------------------------------------------------------- the site

@pytest.fixture(scope='module')
def site():
    "Build the site into _docs/ as `make docs` does"
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'docs.py'), 'build'], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, 'MPLBACKEND': 'Agg'})
    assert r.returncode == 0, f'the docs build failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}'
    assert (DOCS/'index.html').exists()
    return DOCS

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

@pytest.fixture(scope='module')
def server(site):
    "`_docs/` served over HTTP on a free port of 127.0.0.1, from a thread"
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------------------------------------------- the browser

class DevTools:
    "A small client of the Chrome DevTools protocol: one page target, commands by id, events buffered"
    def __init__(self, ws_url:str):
        from websockets.sync.client import connect
        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id, self.events = 0, []

    def __call__(self, method:str, timeout:float=30, **params):
        "Send a command and return its result; events that arrive meanwhile are kept in `self.events`"
        self.next_id += 1
        self.ws.send(json.dumps({'id': self.next_id, 'method': method, 'params': params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.01, end - time.monotonic())))
            if msg.get('id') == self.next_id:
                if 'error' in msg: raise RuntimeError(f'{method}: {msg["error"]}')
                return msg.get('result', {})
            if 'method' in msg: self.events.append(msg)

    def drain(self, seconds:float=0.):
        "Collect the events that arrive within `seconds`"
        end = time.monotonic() + seconds
        while True:
            try: msg = json.loads(self.ws.recv(timeout=max(0, end - time.monotonic())))
            except TimeoutError: return
            if 'method' in msg: self.events.append(msg)

    def wait_event(self, name:str, timeout:float=30):
        end = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e['method'] == name: return self.events.pop(i)
            left = end - time.monotonic()
            if left <= 0: raise TimeoutError(f'no {name} within {timeout}s')
            try: msg = json.loads(self.ws.recv(timeout=left))
            except TimeoutError: continue
            if 'method' in msg: self.events.append(msg)

    def js(self, expr:str):
        "The value of a JavaScript expression (awaited if a promise)"
        r = self('Runtime.evaluate', expression=expr, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in r: raise RuntimeError(f'{expr}: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def goto(self, url:str):
        "Load `url` and wait for its load event, and for the page's own scripts to settle"
        self.events.clear()
        self('Page.navigate', url=url)
        self.wait_event('Page.loadEventFired')
        self.drain(0.3)

    def close(self): self.ws.close()

@pytest.fixture(scope='module')
def browser(chromium, tmp_path_factory):
    "Headless Chromium (conftest's `chromium`) with a fresh profile, driven over --remote-debugging-port"
    profile = tmp_path_factory.mktemp('chromium-profile')
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f'--user-data-dir={profile}', '--remote-debugging-port=0',
                             '--window-size=1280,900', 'about:blank'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file, end = profile/'DevToolsActivePort', time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None: pytest.fail(f'Chromium exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}')
            if time.monotonic() > end: pytest.fail('Chromium did not open its DevTools port within 60 s')
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=30))
        page = next(t for t in targets if t['type'] == 'page')
        tools = DevTools(page['webSocketDebuggerUrl'])
        for domain in ('Page', 'Runtime', 'Log', 'Network'): tools(f'{domain}.enable')
        tools('Emulation.setDeviceMetricsOverride', width=1280, height=900, deviceScaleFactor=1, mobile=False)
        yield tools
        with contextlib.suppress(Exception): tools('Browser.close', timeout=5)
        tools.close()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired): proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)

COLLECT = """JSON.stringify({
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  images: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
  ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  sidebar: [...document.querySelectorAll('#quarto-sidebar a.sidebar-link')].filter(a => a.getAttribute('href')).map(a => a.href),
  text: document.body.innerText,
})"""

def _problems(events:list, base:str) -> list:
    "The console errors, uncaught exceptions and failed requests among a page's DevTools events"
    out = []
    for e in events:
        m, p = e['method'], e['params']
        if m == 'Runtime.exceptionThrown':
            d = p['exceptionDetails']
            out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == 'Runtime.consoleAPICalled' and p['type'] in ('error', 'assert'):
            out.append(f"console.{p['type']}: {' '.join(str(a.get('value', a.get('description', ''))) for a in p['args'])}")
        elif m == 'Log.entryAdded' and p['entry']['level'] == 'error':
            out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif m == 'Network.responseReceived' and p['response']['url'].startswith(base) and p['response']['status'] >= 400:
            out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        elif m == 'Network.requestWillBeSent' and re.match(r'(https?|wss?):', p['request']['url']) \
                and not p['request']['url'].startswith(base):
            out.append(f"request outside the site: {p['request']['url']}")
        elif m == 'Network.loadingFailed' and not p.get('canceled'):
            out.append(f"request failed: {p.get('errorText')} ({p.get('type')})")
    return out

def _pages(site:Path) -> list:
    return sorted(p.relative_to(site).as_posix() for p in site.rglob('*.html'))

@pytest.fixture(scope='module')
def visits(site, server, browser):
    "Each page of the site loaded once in Chromium: its problems, links, images, element ids, sidebar and text"
    res = {}
    for page in _pages(site):
        browser.goto(server + page)
        res[page] = {**json.loads(browser.js(COLLECT)), 'problems': _problems(browser.events, server)}
    return res

def _status(url:str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as r: return r.status
    except urllib.error.HTTPError as e: return e.code

def _expected_pages() -> set:
    "The page of each notebook: nbdev's output file name (`02_stem.ipynb` -> `stem.html`), in the notebook's folder"
    from nbdev.config import nbpath2html
    nbs = [p for p in NBS.rglob('*.ipynb') if not any(part.startswith(('.', '_')) for part in p.relative_to(NBS).parts)]
    return {nbpath2html(p.relative_to(NBS)).as_posix() for p in nbs}

def _modules() -> dict:
    "Each module of the library with a docs page: `{module: page}`, from nbdev's index of the library"
    from fastai_gray._modidx import d
    return {mod: next(iter(syms.values()))[0].split('#')[0] for mod, syms in d['syms'].items() if syms}

def _public(module:str) -> tuple:
    "`(defined, other)`: the names of `module.__all__` it defines with def or class, and the others (constants, aliases)"
    path = ROOT/(module.replace('.', '/') + '.py')  # fastai_gray.bench.onnx: fastai_gray/bench/onnx.py
    tree = ast.parse((path if path.is_file() else path.with_suffix('')/'__init__.py').read_text())
    names = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and any(getattr(t, 'id', None) == '__all__' for t in n.targets) and isinstance(n.value, ast.List)), [])
    defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return [n for n in names if n in defs], [n for n in names if n not in defs]


@pytest.mark.browser
def test_every_page_loads_without_errors(visits):
    assert 'index.html' in visits and len(visits) >= len(_expected_pages())
    problems = {page: v['problems'] for page, v in visits.items() if v['problems']}
    assert not problems, json.dumps(problems, indent=1)

@pytest.mark.browser
def test_internal_links_resolve(visits, server):
    """Every link within the site answers 200; a link to a public name's entry (`learner.html#gray_learner`, as nbdev
    links a name in backticks) finds that entry on the page"""
    ids = {server + page: set(v['ids']) for page, v in visits.items()}
    api = {n.lower() for mod in _modules() for names in _public(mod) for n in names}
    bad, seen = [], {}
    for page, v in visits.items():
        for href in v['links']:
            if not href.startswith(server): continue
            url, frag = urldefrag(href)
            if url.endswith('/'): url += 'index.html'
            if url not in seen: seen[url] = _status(url)
            if seen[url] != 200: bad.append(f'{page}: {href} -> HTTP {seen[url]}')
            elif frag in api and frag not in ids.get(url, ()): bad.append(f'{page}: {href} -> no element #{frag}')
    assert len(seen) >= len(visits)
    assert not bad, '\n'.join(bad)

@pytest.mark.browser
def test_images_load(visits, server):
    bad = []
    for page, v in visits.items():
        for img in v['images']:
            if not img['ok']: bad.append(f'{page}: {img["src"][:100]} did not load')
            elif img['src'].startswith(server) and _status(img['src']) != 200: bad.append(f'{page}: {img["src"]} not 200')
    assert not bad, '\n'.join(bad)

@pytest.mark.browser
def test_sidebar_lists_every_page_and_nothing_else(visits, server):
    want = _expected_pages()
    assert 'index.html' in want
    for mod, page in _modules().items(): assert page in want, f'{mod} has no notebook page ({page})'
    for page, v in visits.items():
        have = [href[len(server):] for href in v['sidebar'] if href.startswith(server)]
        assert len(have) == len(v['sidebar']), f'{page}: sidebar links outside the site: {v["sidebar"]}'
        assert set(have) == want and len(have) == len(set(have)), \
            f'{page}: sidebar has {sorted(have)}; missing {sorted(want - set(have))}, stray {sorted(set(have) - want)}'

@pytest.mark.browser
def test_module_pages_show_doc_every_public_name(visits):
    "nbdev's processing adds a `show_doc` entry (a heading with the name's id) for each exported function and class"
    missing = []
    for mod, page in _modules().items():
        defined, other = _public(mod)
        ids, text = set(visits[page]['ids']), visits[page]['text']
        missing += [f'{page}: no show_doc for {mod}.{n}' for n in defined if n.lower() not in ids]
        missing += [f'{page}: {mod}.{n} is not on the page' for n in other if n not in text]
    assert not missing, '\n'.join(missing)

@pytest.mark.browser
def test_search_finds_gray_learner(browser, server, visits):
    browser.goto(server + 'index.html')
    assert browser.js("!!document.querySelector('.smalldocs-search input')"), 'no search box on the landing page'
    browser.js("document.querySelector('.smalldocs-search input').focus()")
    browser('Input.insertText', text='gray_learner')
    hrefs, end = [], time.monotonic() + 10
    while not hrefs and time.monotonic() < end:
        time.sleep(0.2)
        hrefs = browser.js("[...document.querySelectorAll('.smalldocs-search-results a.search-result')].map(a => a.href)")
    assert any(urlparse(h).path.endswith('/learner.html') for h in hrefs), f'search results for gray_learner: {hrefs}'
    target = next(h for h in hrefs if urlparse(h).path.endswith('/learner.html'))
    browser.goto(target)
    assert browser.js("location.pathname").endswith('/learner.html')
    assert browser.js("!!document.getElementById('gray_learner')"), 'learner.html has no gray_learner entry'

@pytest.mark.browser
def test_screenshot_of_landing_page(browser, server, site, visits):
    "A screenshot of the landing page, saved as _docs/screenshot.png: not blank, the title and the sidebar on it"
    browser.goto(server + 'index.html')
    png = base64.b64decode(browser('Page.captureScreenshot', format='png')['data'])
    (site/'screenshot.png').write_bytes(png)
    from PIL import Image, ImageStat
    img = Image.open(io.BytesIO(png)).convert('L')
    assert img.size == (1280, 900)
    assert ImageStat.Stat(img).stddev[0] > 10, 'the screenshot is blank'
    assert 'fastai_gray' in visits['index.html']['text']
