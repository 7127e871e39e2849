# Two entry points: `make serve` (set up, then serve a model that needs no download) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint

$(BIN)/vlmserve: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build of torch first, pinned, so the range in pyproject.toml resolves to it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/vlmserve

serve: setup
	$(BIN)/vlmserve serve --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/pytest
