"""``.ci/check_notebooks.py``'s check that the prose quotes printed figures."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "check_notebooks", Path(__file__).parents[1] / ".ci" / "check_notebooks.py"
)
check_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_notebooks)


def _cells(prose: str, printed: str, source: str = "print(x)") -> list[dict]:
    return [
        {"cell_type": "code", "source": [source], "outputs": [{"text": [printed]}]},
        {"cell_type": "markdown", "source": [prose]},
    ]


def test_a_figure_matches_a_printed_number_rounded_to_its_places():
    cells = _cells("The loss fell to 2.16 and recall to 0.870.", "loss 2.1613, recall 0.87\n")
    assert check_notebooks.unprinted_figures(cells) == []


def test_a_figure_nothing_prints_is_reported():
    cells = _cells("The loss fell to 2.17, then 1,234.56.", "loss 2.1613 after 1,234.5\n")
    assert check_notebooks.unprinted_figures(cells) == ["2.17", "1,234.56"]


def test_math_code_tables_versions_and_single_places_are_not_figures():
    prose = (
        "With $\\ln 16 \\approx 2.77$, `lr = 0.003`, torch 2.13 and a ratio of 1.5:\n"
        "| quoted | 0.123 |\n"
        "$$a = 0.69$$"
    )
    assert check_notebooks.unprinted_figures(_cells(prose, "nothing\n")) == []


def test_the_code_of_a_cell_counts_as_printed():
    cells = _cells("We set the decay to 0.95.", "", source="gamma = 0.95")
    assert check_notebooks.unprinted_figures(cells) == []
