"""Sphinx configuration of the book's web edition (``make site``): the executed notebooks of
``chapters/`` rendered with their stored outputs (myst-nb, nothing is re-executed), in the
sphinx-book-theme, with MathJax 2 served from the build itself (the ``jupyter-server-mathjax``
package's copy), so that neither the build nor a reader's browser needs the network.

The source folder is the repository root (``sphinx-build -c web .``); ``include_patterns``
keeps it to this folder's pages and the notebooks, so the chapters' jupytext ``.py`` pairs,
the README and the code are not pages. Plain Sphinx rather than Jupyter Book: Jupyter Book 1
is a wrapper over these same packages that pins older releases of them, and Jupyter Book 2
(mystmd) runs on Node.js and fetches its theme from the network at build time.
"""

import shutil
from pathlib import Path

import jupyter_server_mathjax

project = "Attention, from a buggy sketch to a trainable GPT"
author = "the attnbook authors"
copyright = "the attnbook authors, MIT licence"

extensions = ["myst_nb"]
root_doc = "web/index"
include_patterns = ["web/*.md", "chapters/*.ipynb", "chapters/solutions/*.ipynb"]
exclude_patterns = ["**/.ipynb_checkpoints"]

# The stored outputs are the book: never execute a notebook while building.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
# $$...$$ inside a paragraph is displayed math, as JupyterLab shows it.
myst_dmath_double_inline = True

html_theme = "sphinx_book_theme"
html_title = "Attention, from a buggy sketch to a trainable GPT"
html_theme_options = {"show_toc_level": 2}
html_favicon = "favicon.svg"
html_extra_path = ["root"]
# Light unless the reader switches (the theme leaves the mode unset and logs an error).
html_context = {"default_mode": "light"}

# MathJax 2.7 from the build's own _static folder, reading Sphinx's math markup (myst-parser's
# own MathJax settings are for MathJax 3 and off).
MATHJAX = Path(jupyter_server_mathjax.__file__).parent / "static"
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
myst_update_mathjax = False
mathjax2_config = {
    "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]]},
    # The package ships the STIX web fonts only. MathJax's blank test font points at
    # about:blank, which browsers refuse with a console error; a local() name fails quietly.
    # The theme's rules for MathJax 3 (flexbox, overflow hidden on .math) also hit MathJax 2's
    # own span.math boxes: they lift inline math off the baseline and push displayed math right
    # (and clip a wide formula on a phone, which scrolls instead).
    "HTML-CSS": {
        "availableFonts": [],
        "webFont": "STIX-Web",
        "imageFont": None,
        "styles": {
            "@font-face": {"font-family": "MathJax_Blank", "src": "local('MathJax_Blank')"},
            "span.math": {"display": "inline", "overflow": "visible"},
            "div.math": {"display": "block", "overflow-x": "auto"},
        },
    },
}


def copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        shutil.copytree(MATHJAX, Path(app.outdir) / "_static" / "mathjax", dirs_exist_ok=True)


def setup(app):
    app.connect("build-finished", copy_mathjax)
