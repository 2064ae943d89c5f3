"""The book in JupyterLab, as ``make book-server`` starts it, driven through its UI in Chromium:
a chapter runs from top to bottom with Run All and no error, and a chapter's jupytext ``.py``
pair opens as a notebook. The server works on a copy of chapters/ (the ``jupyterlab`` fixture).
"""

import json
import re
from pathlib import Path

import pytest

PlaywrightTimeout = pytest.importorskip("playwright.sync_api").TimeoutError

pytestmark = pytest.mark.browser

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
RUN = "02_scaled_dot_product_attention.ipynb"
PAIR = "03_multi_head_attention.py"

# The code cells' prompts: "[ ]:" not run, "[*]:" queued or running, "[7]:" ran seventh.
PROMPTS = """[...document.querySelectorAll(".jp-CodeCell .jp-InputPrompt")]
    .map(e => e.textContent.trim())"""
# True once the outputs are cleared: no cell shows that it ran.
NONE_RAN = f"() => {PROMPTS}.every(p => p === '[ ]:')"
# True once Run All started: some cell is queued or ran.
STARTED = f"() => !({NONE_RAN})()"
# True once every code cell ran: each shows its execution count.
ALL_RAN = (
    rf"() => {{ const p = {PROMPTS}; return p.length > 0 && p.every(x => /^\[\d+\]:$/.test(x)); }}"
)
# True once a cell shows a traceback: Run All stops there and the cells after it never run.
RAISED = """() => [...document.querySelectorAll(".jp-OutputArea-output")]
    .some(e => e.textContent.includes("Traceback"))"""


def _menu(page, menu: str, command: str, took_effect: str):
    """Click ``menu`` in the menu bar, then its item that runs ``command``, until the JavaScript
    predicate ``took_effect`` holds. A click that lands while JupyterLab is still laying out its
    panels can be dropped without an error; clicking again is then safe, since nothing ran."""
    for _ in range(3):
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{menu}$")).click()
        page.locator(f".lm-Menu-item[data-command='{command}']").click()
        try:
            page.wait_for_function(took_effect, timeout=15_000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")  # close the menu if it is still open
    pytest.fail(f"{menu} > {command} had no effect after 3 clicks; prompts: {_prompts(page)}")


def _prompts(page) -> list[str]:
    return page.evaluate(f"() => {PROMPTS}")


def _images(cells: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))


@pytest.fixture
def lab_page(jupyterlab, chromium):
    """A browser page on the ``jupyterlab`` server; requests leaving it are refused. JupyterLab
    draws only the cells near the view unless told otherwise, and the tests read every cell."""
    settings = jupyterlab.config / "lab/user-settings/@jupyterlab/notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    context.route(
        "**/*",
        lambda route: (
            route.continue_() if route.request.url.startswith(jupyterlab.url) else route.abort()
        ),
    )
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def test_run_all_cells_of_a_chapter_through_the_ui(jupyterlab, lab_page):
    page = lab_page
    page.goto(f"{jupyterlab.url}/lab/tree/{RUN}?token={jupyterlab.token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")
    _menu(page, "Edit", "editmenu:clear-all", NONE_RAN)  # the prompts then show what this run did
    _menu(page, "Run", "runmenu:run-all", STARTED)
    try:
        page.wait_for_function(f"() => ({ALL_RAN})() || ({RAISED})()", timeout=240_000)
    except PlaywrightTimeout:
        pytest.fail(f"Run All did not finish in 240 s; prompts: {_prompts(page)}")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    shown = page.locator(".jp-OutputArea-output").all_inner_texts()
    assert not [text for text in shown if "Traceback" in text]
    figures = page.eval_on_selector_all(
        ".jp-OutputArea-output img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)"
    )
    assert figures and all(figures), "a figure did not render"

    page.keyboard.press("Control+s")  # then read what ran from the saved notebook
    page.wait_for_selector(".lm-TabBar-tab.jp-mod-current:not(.jp-mod-dirty)")
    cells = json.loads((jupyterlab.root / RUN).read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1))
    errors = [o for cell in code for o in cell["outputs"] if o["output_type"] == "error"]
    assert errors == [], f"Run All raised: {errors[0]['ename']}: {errors[0]['evalue']}"
    stored = json.loads((CHAPTERS / RUN).read_text())["cells"]
    assert _images(cells) == _images(stored) == len(figures)


def test_a_py_chapter_opens_as_a_notebook(jupyterlab, lab_page):
    page = lab_page
    page.goto(f"{jupyterlab.url}/lab?token={jupyterlab.token}")
    item = page.locator(".jp-DirListing-item", has=page.get_by_text(PAIR, exact=True))
    item.click(button="right")
    page.locator(".lm-Menu-item", has_text="Open With").hover()
    open_with = page.locator(".lm-Menu-item[data-command='filebrowser:open']")
    open_with.filter(has_text=re.compile("^Notebook$")).click()
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-MarkdownCell h1").first.wait_for()
    assert panel.locator(".jp-MarkdownCell h1").first.inner_text().startswith("Chapter 3")
    assert panel.locator(".jp-CodeCell .jp-InputArea-editor").count() > 0
    assert page.locator(".lm-TabBar-tab.jp-mod-current").inner_text().strip() == PAIR
