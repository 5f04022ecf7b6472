# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install zoblackbox from this checkout.
# Override the torch requirement with e.g. `make test TORCH_SPEC="torch==2.14.1"`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,distributed,bench-core,gym,pde
BIN := $(VENV)/bin
STAMP := $(VENV)/.zoblackbox-installed

.PHONY: demo test venv lint bench-quick clean

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

lint: $(STAMP)
	$(BIN)/ruff check zoblackbox adapters benchmarks tests

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
