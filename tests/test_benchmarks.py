"""Every script in benchmarks/ runs end to end at a tiny size, so none rots when the code it
imports moves: each runs in a subprocess, exits 0 and prints its ratio or table.

The sizes are the smallest each script's --help allows; the numbers they print mean nothing here.
Every script runs in a subprocess, most start Ray or vLLM: the module is `integration` and `slow`
(CI runs it; `make test` leaves it out).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "benchmarks"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_script(script: str, *args: str, timeout: int = 300, prelude: str = "") -> str:
    """`python benchmarks/SCRIPT ARGS` from the repository root; its output, after asserting exit 0.

    PYTHONPATH is the repository: a script's own directory comes first on sys.path, so without
    it `jobs` would be whatever copy is installed, not the code under test. `prelude` runs first
    in the same interpreter (e.g. to make packages unimportable)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    path = SCRIPTS / script
    assert path.is_file(), f"{path} is gone: update tests/test_benchmarks.py and the READMEs"
    if prelude:
        argv = [str(path), *args]
        run = f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path({str(path)!r}, run_name='__main__')"
        code = f"{prelude}\n{run}"
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, str(path), *args]
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    where = f"{script} {' '.join(args)}"
    assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{output[-4000:]}"
    return proc.stdout


def test_every_benchmark_script_has_a_test():
    tested = {
        "engines_bench.py",
        "gpu_check.py",
        "gpu_recipe.py",
        "grpo_bench.py",
        "logits_bench.py",
        "memory_options_bench.py",
        "packed_bench.py",
        "prepare_bench.py",
        "ray_overhead.py",
        "serve_bench.py",
        "stream_bench.py",
        "sweep_bench.py",
        "train_bench.py",
    }
    scripts = {p.name for p in SCRIPTS.glob("*.py")}
    assert scripts == tested, f"untested: {scripts - tested}, gone: {tested - scripts}"


# ---------------------------------------------------------------- gpu_check.py

# What a lent GPU machine may lack (deepspeed needs pydantic); the script must not need any of it,
# nor this repository's packages.
ABSENT = ("ray", "pydantic", "deepspeed", "typer", "pytest", "jobs", "tune", "serve", "cluster")


def test_gpu_check_cpu_smoke_runs_without_ray_pydantic_or_the_repo():
    block = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in ABSENT)
    out = run_script("gpu_check.py", "--cpu-smoke", prelude=block, timeout=240)
    assert "| check" in out and "| status |" in out
    assert "| LoRA on a bf16 base trains, reloads" in out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "| pass " in lines["LoRA on a bf16 base trains, reloads"]
    for row in (
        "LoRA step, sdpa",
        "LoRA step, FSDP2 (world size 1)",
        "serving: peft generate, mixed adapters",
    ):
        assert "| ok " in lines[row] and "tok/s" in lines[row], lines[row]
    for gpu_only in (
        "QLoRA trains a 4-bit base",
        "LoRA step, flash_attention_2",
        "LoRA step, sdpa + Liger kernels",
    ):
        assert "| skip " in lines[gpu_only] and "needs CUDA" in lines[gpu_only]
    # a missing package is a skip row that names it
    deepspeed = lines["LoRA step, DeepSpeed ZeRO-2 (world size 1)"]
    assert "| skip " in deepspeed and "not importable" in deepspeed


def test_gpu_check_deepspeed_row_on_cpu():
    out = run_script("gpu_check.py", "--cpu-smoke", "--only", "deepspeed", timeout=400)
    row = next(line for line in out.splitlines() if "DeepSpeed ZeRO-2" in line)
    assert "| ok " in row and "tok/s" in row, row


# ---------------------------------------------------------------- gpu_recipe.py

# What the recipe's check must run without: a lent GPU machine cannot carry Ray, vLLM or the
# trackers (benchmarks/README.md: the wheels it carries).
NOT_CARRIED = ("ray", "vllm", "wandb", "mlflow", "deepspeed", "boto3", "s3fs")


def test_gpu_recipe_cpu_smoke_runs_the_recipe_without_ray():
    block = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in NOT_CARRIED)
    out = run_script("gpu_recipe.py", "--cpu-smoke", prelude=block, timeout=240)
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for row in (
        "SFT LoRA step (jobs.objectives.sft)",
        "DPO LoRA step (jobs.objectives.dpo)",
        "GRPO loss step (jobs.objectives.grpo)",
        "SFT loss fwd+bwd, 128k vocab, chunked (recipe)",
        "SFT loss fwd+bwd, 128k vocab, whole logits",
        "serving: HFEngine, mixed adapters",
    ):
        assert "| ok " in lines[row] and "tok/s" in lines[row], lines[row]
    assert "| skip " in lines["SFT QLoRA step (NF4 base)"]


# ---------------------------------------------------------------- the CPU benchmarks


def test_prepare_bench_tiny(tiny_model_dir):
    out = run_script(
        "prepare_bench.py",
        "--rows",
        "300",
        "--dedup-docs",
        "200",
        "--tokenizer",
        str(tiny_model_dir),
    )
    assert "rows/s" in out and "pipeline / baseline" in out
    assert "recall" in out and "ratio: time" in out


def test_serve_bench_tiny():
    out = run_script(
        "serve_bench.py",
        "--requests",
        "4",
        "--max-tokens",
        "2",
        "--batch",
        "2",
        "--adapters",
        "2",
        "--hidden",
        "64",
        "--layers",
        "1",
        "--repeats",
        "1",
    )
    assert "| (b) mixed batches" in out and "(b)/(a) =" in out


def test_train_bench_packing_tiny():
    out = run_script(
        "train_bench.py", "--part", "packing", "--steps", "1", "--hidden", "64", "--layers", "1"
    )
    assert "packed / padded:" in out


def test_train_bench_trl_tiny():
    out = run_script(
        "train_bench.py",
        "--part",
        "trl",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--hidden",
        "64",
        "--layers",
        "1",
    )
    assert "ours / SFTTrainer:" in out


def test_ray_overhead_plain_only(tiny_model_dir):
    """The loop a GPU machine without Ray runs (benchmarks/README.md's GPU table)."""
    out = run_script(
        "ray_overhead.py",
        "--plain-only",
        "--steps",
        "3",
        "--repeats",
        "1",
        f"model.name_or_path={tiny_model_dir}",
    )
    assert "plain PyTorch loop" in out and "tokens/s" in out


# ---------------------------------------------------------------- the benchmarks that start Ray


def test_ray_overhead_tiny(tiny_model_dir):
    """`make benchmark`: the Ray Train job against the plain loop, and the ratio."""
    out = run_script(
        "ray_overhead.py",
        "--steps",
        "3",
        "--repeats",
        "1",
        f"model.name_or_path={tiny_model_dir}",
        timeout=400,
    )
    assert "Ray Train job, 1 worker" in out and "ratio Ray / plain:" in out
    assert "in this process (scaling.local)" in out and "ratio worker / local:" in out


def test_serve_bench_layouts_tiny():
    out = run_script(
        "serve_bench.py",
        "--layouts",
        "--samples",
        "2",
        "--requests",
        "4",
        "--max-tokens",
        "2",
        "--batch",
        "2",
        "--hidden",
        "64",
        "--layers",
        "1",
        timeout=500,
    )
    assert "| single |" in out and "| routed |" in out


def test_train_bench_memory():
    """One of the four strategies (the most sharded) on a small model: a 2-worker Ray Train run,
    the costly part here; the others run the same measuring code."""
    args = ["--part", "memory", "--strategies", "zero3", "--memory-hidden", "64"]
    out = run_script("train_bench.py", *args, "--memory-layers", "2", timeout=900)
    assert "  zero3 " in out and "peak RSS per worker" in out


def test_sweep_bench_tiny(tiny_model_dir):
    args = ["--ranks", "4", "--alphas", "8", "--lrs", "1e-3", "--max-steps", "2", "--rows", "200"]
    args += ["--trials", "1", "--searchers", "optuna"]  # random search: the same code, another name
    out = run_script("sweep_bench.py", "--model", str(tiny_model_dir), *args, timeout=900)
    assert "ASHA replayed on the grid's eval curves" in out and "ASHA / grid: steps" in out
    assert "random vs TPE, both with ASHA, at a budget of" in out
    assert re.search(r"^optuna\s+\d+\s+\d+\s+\d+\.\d+", out, re.MULTILINE), out[-3000:]


# ---------------------------------------------------------------- packed_bench.py


def test_packed_bench_tiny():
    """4 packed trials vs 4 separate ones (6 processes, no Ray): the table and the ratios."""
    out = run_script(
        "packed_bench.py",
        "--max-steps",
        "2",
        "--rows",
        "120",
        "--hidden",
        "64",
        "--layers",
        "1",
        "--repeats",
        "1",
    )
    assert "| 4 packed |" in out and "packed / separate wall time:" in out
    assert "packed peak RSS / one separate trial's:" in out
    assert "max relative difference" in out


def test_engines_bench_tiny():
    pytest.importorskip("vllm")
    out = run_script(
        "engines_bench.py",
        *("--requests", "4", "--rate", "4", "--rounds", "1"),
        *("--max-tokens", "8", "--burst-tokens", "4"),
        timeout=900,
    )
    assert "| poisson | vllm |" in out and "| poisson | hf |" in out
    assert re.search(r"vllm / hf = \d+\.\d+", out)


def test_grpo_bench_tiny():
    """The rollout benchmark at its smallest: the hf engine and (where installed) vLLM, sync
    (async rollouts are tests/test_grpo_job.py's; each vLLM start costs a minute or two)."""
    out = run_script(
        "grpo_bench.py", "--steps", "2", "--rounds", "1", "--modes", "sync", timeout=1200
    )
    assert "| hf sync |" in out
    if importlib.util.find_spec("vllm") is not None:
        assert "| vllm sync |" in out
        assert re.search(r"steps/s vllm sync / hf sync = \d+\.\d+", out)


def test_logits_bench_tiny():
    """Chunked vs whole logits at a small vocabulary and short rows: both run, each in its own
    process, and the table and the ratios print (TRL's fused head, an option, is left out: 12 s)."""
    args = ["--vocab", "512", "--seq-len", "32", "--rounds", "1"]
    out = run_script("logits_bench.py", *args, timeout=240)
    assert "| chunked |" in out and "chunked / whole: peak memory" in out


def test_memory_options_bench_tiny():
    """One option of each group (activation offloading with LoRA, FSDP2 CPU offload of a full
    fine-tune on a one-rank gloo group), each in its own process; the table prints."""
    args = ["--hidden", "64", "--layers", "1", "--seq", "32", "--steps", "2", "--rounds", "1"]
    out = run_script("memory_options_bench.py", *args, "--options", "offloading,fsdp+cpu_offload")
    assert "| offloading |" in out and "| fsdp+cpu_offload |" in out
    assert "losses against fsdp+cpu_offload: max relative difference" in out


def test_stream_bench_tiny():
    """One tiny stored set, one job round (trained in its driver), and the readers' table."""
    args = ["--sizes-gb", "0.002", "--rounds", "1", "--steps", "1", "--local"]
    out = run_script("stream_bench.py", *args, timeout=300)
    assert re.search(r"\| 0.002 GB \| \d+ \| \d+ \| \d+ \|", out)
    assert "| Parquet row groups (the job's) |" in out
