# Two entry points: `make serve` (set up, then serve a model that needs no download) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint demo-model browser

$(BIN)/vlmserve: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build of torch first, pinned, so the range in pyproject.toml resolves to it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/vlmserve

serve: setup
	$(BIN)/vlmserve serve --host $(HOST) --port $(PORT)

# tests/test_playground.py drives the system Chromium through Playwright (it never downloads a browser of its
# own). As root on Debian (CI), `make test` installs the distribution's chromium (~300 MB) when it is missing;
# elsewhere the test skips without one.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "no Chromium: tests/test_playground.py will skip (apt-get install chromium)"

test: setup browser
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/pytest

# Retrain the shipped demo model (docs/DEMO_MODEL.md): two stages on a CUDA GPU (about 17 minutes), then the
# JSON-answer fine-tune on one CPU thread (25 minutes), then evaluate it. Writes demo_stage1/, demo_stage2/
# and demo_model/; copy demo_model/* over src/vlmserve/demo_model/ to ship it.
TRAIN := PYTHONPATH=src $(PY) -m vlmserve.training.train --device cuda --batch-size 64 --steps 100000 \
	--vision-steps 100000 --eval-every 400 --log-every 100
JSON_STAGE := PYTHONPATH=src $(PY) -m vlmserve.training.train --device cpu --threads 1 --batch-size 16 \
	--lr 3e-4 --warmup 0.05 --json-share 0.5 --freeze-vision --steps 1000 --minutes 25 --eval-every 250 --log-every 50
demo-model:
	$(TRAIN) --out demo_stage1 --lr 1e-3 --vision-minutes 4 --minutes 4.2
	$(TRAIN) --out demo_stage2 --init demo_stage1 --seed 2 --lr 5e-4 --warmup 0.02 --vision-minutes 3 --minutes 5.5
	$(JSON_STAGE) --out demo_model --init demo_stage2 --seed 3
	PYTHONPATH=src $(PY) -m vlmserve.training.evaluate --model demo_model --n 100
