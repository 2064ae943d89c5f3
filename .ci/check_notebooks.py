"""Fail when a chapter notebook is not committed executed, or has no jupytext pair, or a chapter
lacks a part every chapter has.

nbval only compares cells that have a stored execution count, so an unexecuted cell would pass
unchecked; an error output is only acceptable in a cell tagged ``raises-exception``. Every chapter
has the headings in ``SECTIONS`` and a solutions notebook.
"""

import json
import sys
from pathlib import Path

SECTIONS = ("Check against the module", "Summary", "Further reading", "Exercises")

problems = []
notebooks = sorted(Path("chapters").glob("**/*.ipynb"))
notebooks = [nb for nb in notebooks if ".ipynb_checkpoints" not in nb.parts]
for nb_path in notebooks:
    if not nb_path.with_suffix(".py").exists():
        problems.append(f"{nb_path}: no jupytext pair {nb_path.with_suffix('.py')}")
    for i, cell in enumerate(json.loads(nb_path.read_text())["cells"]):
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
    or f"{len(notebooks)} notebooks: executed and paired; every chapter "
    f"has {', '.join(SECTIONS)} and solutions"
)
sys.exit(1 if problems else 0)
