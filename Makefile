# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install zoblackbox from this checkout.
# `make docs` builds the documentation site into docs/_build/html (installs the docs extra first).
# Override the torch requirement with e.g. `make test TORCH_SPEC="torch==2.14.1"`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,distributed,bench-core,gym,pde
BIN := $(VENV)/bin
STAMP := $(VENV)/.zoblackbox-installed
DOCS_STAMP := $(VENV)/.zoblackbox-docs-installed
SPHINXOPTS ?=

.PHONY: demo test venv lint typecheck docs bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/zoblackbox demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff, then mypy on the package (configuration: [tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check zoblackbox adapters benchmarks tests docs
	$(BIN)/mypy

typecheck: $(STAMP)
	$(BIN)/mypy

# The docs extra (sphinx and friends) is kept out of EXTRAS: `make test` does not need it.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),docs]"
	touch $(DOCS_STAMP)

# Offline, warnings are errors; the gallery examples run during the build.
docs: $(DOCS_STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html $(SPHINXOPTS) docs docs/_build/html

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache docs/_build docs/generated docs/auto_examples docs/sg_execution_times.rst
