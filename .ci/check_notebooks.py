"""Fail when a chapter notebook is not committed executed, or has no jupytext pair, or a chapter
lacks a part every chapter has, or its prose quotes a figure that nothing printed.

nbval only compares cells that have a stored execution count, so an unexecuted cell would pass
unchecked; an error output is only acceptable in a cell tagged ``raises-exception``. Every chapter
has the headings in ``SECTIONS`` and a solutions notebook. A decimal written with two or more
places in a markdown cell (outside math, code, tables and version numbers) is a measured
figure: some output or code of the same notebook must give it (equal after rounding to the
places written), or ``QUOTED`` must list it with where it comes from (a paper, a run outside
the notebook, arithmetic).
"""

import json
import re
import sys
from pathlib import Path

SECTIONS = ("Check against the module", "Summary", "Further reading", "Exercises")
QUOTED = Path(".ci/quoted_figures.txt")  # lines: notebook path, figure, where it comes from
# a figure: 0.87, 1,234.56 (also at a sentence's end); not 1.5, v1.22 or the 2.13 of 1.2.13
FIGURE = re.compile(r"(?<![\w.,$^_{\\])((?:\d{1,3}(?:,\d{3})+|\d+)\.\d{2,})(?!\w|\.\d)")
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e-?\d+)?")
NOT_PROSE = re.compile(  # math, code, tables, version numbers
    r"\$\$[^$]*\$\$|\$[^$]*\$|`[^`]*`|^\|[^\n]*$|\b(?:torch|Python|PyTorch) \d+(?:\.\d+)+", re.M
)


def unprinted_figures(cells: list[dict]) -> list[str]:
    """The figures of the markdown cells that no code cell's source or text output gives."""
    printed = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        texts = ["".join(cell["source"])]
        for out in cell.get("outputs", []):
            texts.append("".join(out.get("text", "")))
            texts += ["".join(out.get("data", {}).get(k, "")) for k in ("text/plain", "text/html")]
        printed.update(float(n) for n in NUMBER.findall("\n".join(texts).replace(",", "")))
    missing = []
    for cell in cells:
        if cell["cell_type"] != "markdown":
            continue
        for figure in FIGURE.findall(NOT_PROSE.sub(" ", "".join(cell["source"]))):
            places = len(figure.split(".")[1])
            if not any(round(value, places) == float(figure.replace(",", "")) for value in printed):
                missing.append(figure)
    return missing


def main() -> int:
    problems = []
    quoted = set()  # (notebook, figure); each line also names the figure's source
    for line in QUOTED.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            path, figure, _source = line.split(maxsplit=2)
            quoted.add((path, figure))
    unused = set(quoted)
    notebooks = sorted(Path("chapters").glob("**/*.ipynb"))
    notebooks = [nb for nb in notebooks if ".ipynb_checkpoints" not in nb.parts]
    for nb_path in notebooks:
        if not nb_path.with_suffix(".py").exists():
            problems.append(f"{nb_path}: no jupytext pair {nb_path.with_suffix('.py')}")
        cells = json.loads(nb_path.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "code" or not "".join(cell["source"]).strip():
                continue
            if cell.get("execution_count") is None:
                problems.append(f"{nb_path}: code cell {i} was never executed")
            tags = cell.get("metadata", {}).get("tags", [])
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if errors and "raises-exception" not in tags:
                problems.append(
                    f"{nb_path}: code cell {i} stored an error but is not tagged raises-exception"
                )
        for figure in unprinted_figures(cells):
            if (str(nb_path), figure) in quoted:
                unused.discard((str(nb_path), figure))
            else:
                problems.append(
                    f"{nb_path}: the prose says {figure}, which no cell prints: quote the printed "
                    f"value, print it, or list it in {QUOTED} with where it comes from"
                )
    problems += [f"{QUOTED}: {path} no longer needs {figure}" for path, figure in sorted(unused)]
    for py_path in sorted(Path("chapters").glob("**/*.py")):
        if not py_path.with_suffix(".ipynb").exists():
            problems.append(f"{py_path}: no executed notebook {py_path.with_suffix('.ipynb')}")
    for chapter in sorted(Path("chapters").glob("[0-9][0-9]_*.py")):
        headings = [line for line in chapter.read_text().splitlines() if line.startswith("# ## ")]
        missing = [name for name in SECTIONS if not any(name in line for line in headings)]
        if missing:
            problems.append(f"{chapter}: no heading {', '.join(repr(m) for m in missing)}")
        solutions = Path("chapters/solutions") / f"{chapter.stem}_solutions.ipynb"
        if not solutions.exists():
            problems.append(f"{chapter}: no worked solutions {solutions}")
    print(
        "\n".join(problems)
        or f"{len(notebooks)} notebooks: executed and paired; every chapter has "
        f"{', '.join(SECTIONS)} and solutions; every figure in the prose is printed or quoted"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
