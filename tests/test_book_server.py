"""Saving a chapter from JupyterLab, as ``make book`` starts it, updates the chapter's ``.py`` pair.

``make book`` roots the server at ``chapters/``: jupytext only reads a configuration file found
between the notebook's folder and that root, so the pairing must live inside ``chapters/``.
The test starts JupyterLab on a copy of the chapters folder (the ``jupyterlab`` fixture), saves
two notebooks (one in a subfolder) through the server's contents API, and reads their ``.py`` files.
"""

import secrets

import pytest

SAVED = ["01_buggy_sketch.ipynb", "solutions/02_scaled_dot_product_attention_solutions.ipynb"]


@pytest.mark.parametrize("name", SAVED)
def test_saving_a_notebook_in_jupyterlab_updates_its_py(jupyterlab, name):
    py = (jupyterlab.root / name).with_suffix(".py")
    before = py.read_text()
    model = jupyterlab.api("GET", f"{name}?content=1&type=notebook")
    marker = f"Edited in JupyterLab {secrets.token_hex(4)}"
    markdown = next(c for c in model["content"]["cells"] if c["cell_type"] == "markdown")
    markdown["source"] += f"\n\n{marker}"
    jupyterlab.api("PUT", name, {"type": "notebook", "format": "json", "content": model["content"]})
    after = py.read_text()
    assert marker in after, f"{py.name} was not updated when {name} was saved"
    assert after.replace(f"#\n# {marker}\n", "") == before  # only the edit, in py:percent form
