# `make demo` and `make test` are the whole set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU wheel; a CUDA machine can install its own torch first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-unit test-e2e lint install clean

$(BIN)/posttrain: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/posttrain

install: $(BIN)/posttrain

demo: install
	$(BIN)/posttrain demo

test: install
	$(BIN)/python -m pytest -q tests

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

test-e2e: install
	$(BIN)/python -m pytest -q tests/e2e

lint: install
	$(BIN)/ruff check posttrain tests bench

clean:
	rm -rf $(VENV) runs logs results *.egg-info
