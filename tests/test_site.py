"""The web edition (``make site``) in a browser: every page of the built site, served from
localhost, loads without console errors and without a request leaving localhost, shows every
figure its notebook stores, renders its math, and every link inside the site resolves; each
chapter links to its solutions; the first page lists the chapters in book order; search works.

The site is built by ``make site`` (``make browser-test`` builds it first); these tests read
``_build/site`` and skip (fail under ``ATTNBOOK_REQUIRE_BROWSER=1``) when it is missing.
"""

import functools
import http.server
import json
import re
import threading
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
SITE = ROOT / "_build" / "site"
NOTEBOOKS = sorted(CHAPTERS.glob("[0-9]*.ipynb")) + sorted(CHAPTERS.glob("solutions/*.ipynb"))
PAGES = ["web/index"] + [nb.relative_to(ROOT).with_suffix("").as_posix() for nb in NOTEBOOKS]

# Resolves when MathJax 2 has typeset the page (at once on a page without math).
MATHJAX_DONE = """() => window.MathJax
    ? new Promise(done => MathJax.Hub.Register.StartupHook("End", done)) : null"""

# What a reader sees, read from the page after MathJax ran.
PAGE_STATE = """() => {
    const article = document.querySelector("article");
    const prose = article.cloneNode(true);
    prose.querySelectorAll("pre, code, script, .cell_output, .MathJax, .MathJax_Display")
        .forEach(e => e.remove());
    const math = [...article.querySelectorAll(".math.notranslate")];
    return {
        figures: [...article.querySelectorAll(".cell_output img")].map(img => ({
            src: img.getAttribute("src"), complete: img.complete,
            natural: img.naturalWidth * img.naturalHeight,
            shown: img.getBoundingClientRect().width * img.getBoundingClientRect().height})),
        math: math.length,
        typeset: math.filter(e => e.querySelector(".MathJax, .MathJax_Display")).length,
        math_errors: article.querySelectorAll(".MathJax .merror, .MathJax .noError").length,
        prose: prose.textContent,
        links: [...document.querySelectorAll("a[href]")].map(a => a.href),
        article_links: [...article.querySelectorAll("a[href]")].map(a => a.href),
    };
}"""


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(value for name, value in attrs if name == "id")


@functools.cache
def _ids(path: Path) -> frozenset:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8"))
    return frozenset(parser.ids)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def site(browser_missing):
    """The built site served on a free localhost port: its base URL."""
    if not (SITE / "web" / "index.html").exists():
        browser_missing(f"no web edition in {SITE}: run make site")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def browsing(site, chromium):
    """One browser context for the module's pages: any request for something outside the site
    is refused and recorded in ``outside``."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    outside = []

    def route(route):
        if route.request.url.startswith(site):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    yield context, outside
    context.close()


@pytest.fixture
def open_page(site, browsing):
    """``open_page(path)``: the page at ``path``, typeset, with the console errors it logged and
    the requests for anything outside the site it made."""
    context, outside = browsing
    pages = []

    def open_(path: str):
        outside.clear()
        errors = []
        page = context.new_page()
        pages.append(page)
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{site}/{path}")
        page.wait_for_load_state("load")
        page.evaluate(MATHJAX_DONE)
        return page, errors, outside

    yield open_
    for page in pages:
        page.close()


def _image_outputs(notebook: Path) -> int:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return sum(
        any(mime.startswith("image/") for mime in output.get("data", {}))
        for cell in cells
        for output in cell.get("outputs", [])
    )


def _has_math(notebook: Path) -> bool:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return any("$" in "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def _broken_links(site: str, links: list[str]) -> list[str]:
    """The ``links`` (absolute URLs) into the site whose file or anchor does not exist."""
    broken = []
    for link in links:
        if not link.startswith(site):
            continue
        url = urllib.parse.urlsplit(link)
        path = SITE / urllib.parse.unquote(url.path).lstrip("/")
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            broken.append(link)
        elif url.fragment and path.suffix == ".html":
            if urllib.parse.unquote(url.fragment) not in _ids(path):
                broken.append(link)
    return broken


@pytest.mark.parametrize("name", PAGES)
def test_page_loads_offline_with_figures_math_and_links(site, open_page, name):
    page, errors, outside = open_page(f"{name}.html")
    state = page.evaluate(PAGE_STATE)
    assert errors == [], f"console errors on {name}"
    assert outside == [], f"{name} asked for something outside the site"
    notebook = ROOT / f"{name}.ipynb"
    if notebook.exists():
        assert len(state["figures"]) == _image_outputs(notebook), "figures missing from the page"
        assert _has_math(notebook) == (state["math"] > 0)
    for figure in state["figures"]:
        assert figure["complete"] and figure["natural"] > 0, f"{figure['src']} not decoded"
        assert figure["shown"] > 0, f"{figure['src']} has no size on the page"
    assert state["typeset"] == state["math"], "math left untypeset"
    assert state["math_errors"] == 0, "MathJax could not typeset some math"
    raw = re.findall(r"\$[^$\s][^$]*\$", state["prose"])
    assert raw == [], f"raw $...$ left in the text of {name}"
    assert _broken_links(site, state["links"]) == []
    if notebook.parent == CHAPTERS:
        solutions = f"{site}/chapters/solutions/{notebook.stem}_solutions.html"
        assert solutions in state["article_links"], "no link to the chapter's solutions"


def test_first_page_lists_the_chapters_then_the_solutions_in_book_order(site, open_page):
    page, errors, outside = open_page("web/index.html")
    hrefs = page.eval_on_selector_all(".toctree-wrapper a", "links => links.map(a => a.href)")
    assert hrefs == [f"{site}/{name}.html" for name in PAGES[1:]]
    page.goto(f"{site}/")  # the site's root sends the reader to the first page
    page.wait_for_url(f"{site}/web/index.html")
    assert errors == [] and outside == []


def test_search_finds_a_chapter(open_page):
    page, errors, outside = open_page("search.html?q=softmax")
    results = page.locator("#search-results li a")
    results.first.wait_for()
    assert any("/chapters/" in href for href in results.evaluate_all("as => as.map(a => a.href)"))
    assert errors == [] and outside == []
