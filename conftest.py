"""Repository-wide pytest hooks: a per-notebook timing summary for ``pytest --nbval chapters``.

nbval makes every notebook cell a test item; this sums the cells' durations by notebook and
prints one line per chapter at the end of the run, so the book's time budget stays visible.
"""

from collections import defaultdict

_seconds_by_notebook: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    if report.nodeid.split("::")[0].endswith(".ipynb"):
        _seconds_by_notebook[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds_by_notebook:
        return
    terminalreporter.section("seconds per notebook")
    for path, seconds in sorted(_seconds_by_notebook.items()):
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
    total = sum(_seconds_by_notebook.values())
    terminalreporter.write_line(f"{total:7.1f} s  total")
