# Two commands for a fresh machine: `make quickstart` and `make test`. Both run `make setup` first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
RUN_NAME ?= quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup quickstart test test-slow test-fast benchmark lint clean

setup: $(STAMP)

# Re-runs only when the dependency files change. torch goes first: where there is no CUDA,
# the pinned version is the CPU build on this disk; a plain `torch` requirement would pull CUDA wheels.
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$$(grep -E '^torch==' requirements.lock | cut -d= -f3)"
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

quickstart: setup
	$(BIN)/python -m jobs.tiny_model .cache/tiny-llama
	$(BIN)/python -m jobs.finetune configs/quickstart.yaml run.name=$(RUN_NAME)

# The suite leaves out the long multi-process runs marked slow: `make test-slow` runs them;
# CI (.ci/run) runs both.
test: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-slow: setup
	$(BIN)/python -m pytest -q -m slow --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

# The Ray Train overhead: the real job (1 worker) against a plain PyTorch loop, its ratio printed.
benchmark: setup
	$(BIN)/python -m jobs.tiny_model .cache/tiny-llama
	$(BIN)/python benchmarks/ray_overhead.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# What the commands write (all in .gitignore), the tiny model and the virtualenv.
clean:
	rm -rf $(VENV) .cache runs prepared sweeps pipelines registry merged
