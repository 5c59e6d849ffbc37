"""Tokens/s of the Ray Train job (1 worker) against a plain PyTorch loop, same model, data and step.

    python benchmarks/ray_overhead.py [--steps 150] [key.sub=value ...]     (make benchmark)
    python benchmarks/ray_overhead.py --plain-only --device cuda           (GPU machine without Ray)

Both loops run the job's own setup, batches and SFT step on the same data with the same thread count,
skip the first (warm-up) step, and count non-padding tokens. The Ray side is the real job
(`run_job`), evaluation and checkpoints off during the loop, so the ratio is what Ray Train costs.
Target: ratio >= 0.95. Each round also runs the job in this process (`scaling.local`, Ray Train's
local mode) and prints the median wall time of the whole job both ways: what starting the
controller and worker processes costs a short run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from inference.model import load_tokenizer
from jobs.config import load_config
from jobs.data import load_for_job
from jobs.finetune import StepBatches, plan_steps, run_job, setup
from jobs.objectives import make_objective
from jobs.parallel import job_runtime


def plain_loop(cfg, data, device: torch.device, steps: int) -> float:
    """The baseline: the job's own setup, batches and step in this process, no Ray; tokens/s."""
    rt = job_runtime(cfg, device)
    plan = plan_steps(len(data.train), cfg)
    tokenizer, par = setup(cfg, rt, plan)  # threads, seeds, model, LoRA, optimizer as the job's
    held_out = {"train": data.train, "eval": data.eval, "eval_conversations": []}
    obj = make_objective(cfg, rt, tokenizer, held_out)
    batches = StepBatches(cfg, rt, obj, plan)
    par.model.train()
    tokens, elapsed = 0, 0.0
    for step in range(steps):
        micro = batches.micro_batches(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = obj.train_step(par, micro).tokens
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            elapsed += time.perf_counter() - t0
            tokens += n
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--plain-only", action="store_true", help="skip the Ray run (e.g. where Ray is absent)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as storage:
        overrides = [
            f"train.max_steps={args.steps}",
            "eval.every_steps=null",
            "eval.early_stopping_patience=null",
            "eval.task_metric=none",
            "checkpoint.every_steps=null",
            f"checkpoint.storage_path={storage}",
            "run.name=benchmark",
            *args.overrides,
        ]
        cfg = load_config(args.config, overrides)
        data = load_for_job(cfg, load_tokenizer(cfg.model), f"{storage}/prepared")
        device = torch.device(args.device)
        threads = f"{cfg.scaling.cpus_per_worker:g} threads" if device.type == "cpu" else "GPU"
        # Alternate the two and compare medians: on a small shared machine one run of either
        # varies by 10-15% with whatever else the machine is doing.
        plain, ray_runs, walls = [], [], {"worker": [], "local": []}
        for i in range(args.repeats):
            plain.append(plain_loop(cfg, data, device, args.steps))
            print(f"plain PyTorch loop ({device}, {threads}): {plain[-1]:,.0f} tokens/s")
            if args.plain_only:
                continue
            ray_runs.append(timed_job(cfg, f"benchmark-{i}", False, walls["worker"]))
            timed_job(cfg, f"benchmark-local-{i}", True, walls["local"])
        if ray_runs:
            ratio = statistics.median(ray_runs) / statistics.median(plain)
            print(
                f"median tokens/s: plain {statistics.median(plain):,.0f}, "
                f"Ray {statistics.median(ray_runs):,.0f}; ratio Ray / plain: {ratio:.3f}  "
                f"(target >= 0.95; {args.steps} steps x {args.repeats}, "
                f"config {Path(args.config).name})"
            )
            worker, local = (statistics.median(walls[k]) for k in ("worker", "local"))
            print(
                f"median job wall time: on a Ray Train worker {worker:.1f} s, in this process "
                f"(scaling.local) {local:.1f} s; ratio worker / local: {worker / local:.2f}"
            )


def timed_job(cfg, name: str, local: bool, walls: list[float]) -> float:
    """The real job, on a worker or in this process; its tokens/s, its wall time in `walls`."""
    cfg = cfg.model_copy(
        update={
            "run": cfg.run.model_copy(update={"name": name}),
            "scaling": cfg.scaling.model_copy(update={"local": local}),
        }
    )
    t0 = time.perf_counter()
    rate = run_job(cfg)["metrics"]["train_tokens_per_s"]
    wall = time.perf_counter() - t0
    where = "in this process (scaling.local)" if local else "Ray Train job, 1 worker"
    print(f"{where}: {rate:,.0f} tokens/s, job wall time {wall:.1f} s")
    walls.append(wall)
    return rate


if __name__ == "__main__":
    main()
