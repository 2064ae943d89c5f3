# Two commands do all the set-up themselves (see README.md, "Quick start"):
#   make book    create .venv, install the book, start JupyterLab on chapters/
#   make test    create .venv, install the book, run the unit tests and every notebook under nbval
#   make compare create .venv, install the book, train every attention variant alike and compare
#                them (attnbook compare --quick; COMPARE_ARGS="--full" for the full run)
#   make site    the web edition: the stored notebooks as HTML, in _build/site (open index.html)
# Other targets: make setup | lint | pairs | chapter CH=02 | execute NB=chapters/02_….py | lock | clean
#                | browser-test

PYTHON ?= python3
VENV ?= .venv
# Installed first and on its own, so that pip never picks a newer torch (and its CUDA wheels).
TORCH ?= torch==2.13.0
# Extra pip arguments for the torch install only, e.g. a CPU-only package index on a laptop.
TORCH_PIP_ARGS ?=
JUPYTER_ARGS ?=
COMPARE_ARGS ?= --quick
BIN := $(VENV)/bin
STAMP := $(VENV)/.attnbook-installed
# JupyterLab refuses to run as root without --allow-root (containers, CI machines).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
NOTEBOOKS = $(wildcard chapters/*.ipynb chapters/solutions/*.ipynb)

.PHONY: setup book book-server compare test unit nbval lint pairs chapter execute lock clean \
	site browser-test

# Every package at the version CI passed with (constraints.txt; `make lock` refreshes it).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=chapters $(ROOT_FLAG) $(JUPYTER_ARGS)

# Headless: no browser is opened; open the printed http://127.0.0.1:8888/lab?token=… address.
book-server: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=chapters --no-browser --ip=127.0.0.1 $(ROOT_FLAG) $(JUPYTER_ARGS)

# The book's main experiment: results/compare/recall/{results.md,results.csv,*.png}
compare: $(STAMP)
	$(BIN)/attnbook compare $(COMPARE_ARGS)

test: unit nbval

unit: $(STAMP)
	$(BIN)/pytest

nbval: $(STAMP)
	$(BIN)/pytest --nbval chapters

lint: $(STAMP)
	$(BIN)/ruff check src minbpe tests chapters conftest.py .ci
	$(BIN)/ruff format --check src minbpe tests conftest.py .ci

# Fails when a chapter's .ipynb and .py disagree (run on a clean tree: it syncs, then looks),
# or when a notebook is not stored executed.
pairs: $(STAMP)
	$(BIN)/python .ci/check_notebooks.py
	$(BIN)/jupytext --sync -q $(NOTEBOOKS)
	@test -z "$$(git status --porcelain -- chapters)" || \
	  { git status --porcelain -- chapters; echo "chapters: .ipynb and .py out of sync (see above)"; exit 1; }

# One chapter and its solutions under nbval: make chapter CH=02
chapter: $(STAMP)
	$(BIN)/pytest --nbval $(wildcard chapters/$(CH)_*.ipynb chapters/solutions/$(CH)_*.ipynb)

# Re-execute a chapter from its .py and store the outputs: make execute NB=chapters/02_….py
execute: $(STAMP)
	$(BIN)/jupytext --set-kernel python3 --to ipynb --update $(NB)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	  --ExecutePreprocessor.record_timing=False --ExecutePreprocessor.timeout=600 $(NB:.py=.ipynb)
	$(BIN)/jupytext --sync -q $(NB:.py=.ipynb)

# The web edition from the stored outputs (nothing is executed; Sphinx and myst-nb, configured
# in web/conf.py). Warnings fail the build: a broken link between chapters is an error.
SITE := _build/site
site: $(STAMP)
	$(BIN)/sphinx-build -q -W --keep-going -b html -c web -d _build/doctrees . $(SITE)
	@echo "The web edition: $(SITE)/index.html"

# The web edition and JupyterLab in Debian's Chromium (apt-get install chromium); without it,
# or without playwright, the tests fail here instead of being skipped.
browser-test: site
	ATTNBOOK_REQUIRE_BROWSER=1 $(BIN)/pytest -m browser

# Refresh constraints.txt: the newest release of every dependency, installed into a scratch venv
# beside torch, then frozen. Run the tests (make clean test) before committing the new pins.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install "$(TORCH)" $(TORCH_PIP_ARGS)
	$(LOCK_VENV)/bin/python -m pip install -e ".[dev]"
	{ echo "# Versions CI passed with; pip install -c constraints.txt. Written by make lock."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis _build
