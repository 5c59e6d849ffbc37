"""ASHA vs the full grid on the same space and job: training steps consumed and best eval loss.

    python benchmarks/sweep_bench.py            # ~10 minutes on 2 CPUs (tiny model, 6 configs)
    python benchmarks/sweep_bench.py --lrs 6    # 12 configs, ~20 minutes
    python benchmarks/sweep_bench.py --lrs 1 --ranks 4 --max-steps 2 --rows 200   # smoke run

Both sweeps run the same 6 grid points of the quickstart job (lora.r x train.lr), two trials at a
time; the grid runs every trial to the end, ASHA stops trials at their evals. Target: ASHA uses
<= 40% of the grid's steps with a best eval loss at most 1% worse.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from tune.sweep import SweepConfig, run_sweep


def space(n_lr: int, ranks: list[int]) -> dict:
    """lora.r in `ranks` x n_lr learning rates log-spaced over [1e-4, 3e-3] (3: 3e-4, 1e-3, 3e-3;
    1: 1e-3)."""
    if n_lr == 3:
        lrs = [3.0e-4, 1.0e-3, 3.0e-3]
    elif n_lr == 1:
        lrs = [1.0e-3]
    else:
        lrs = [round(1e-4 * 30 ** (i / (n_lr - 1)), 6) for i in range(n_lr)]
    return {"lora.r": {"grid": ranks}, "train.lr": {"grid": lrs}}


def overrides(max_steps: int) -> list[str]:
    """The quickstart job, shortened: 9 evals (and checkpoints) over max_steps, where ASHA stops."""
    every = max(1, max_steps // 9)
    return [
        "scaling.cpus_per_worker=1",
        f"train.max_steps={max_steps}",
        f"eval.every_steps={every}",
        f"checkpoint.every_steps={every}",
        "eval.early_stopping_patience=null",
        "eval.max_generate_samples=16",
    ]


def sweep(name: str, scheduler: dict, storage: str, args: argparse.Namespace) -> dict:
    job = [*overrides(args.max_steps), f"model.name_or_path={args.model}"]
    if args.rows:  # the first rows of the quickstart's data only: less to prepare and evaluate
        rows = Path(storage) / "reviews.jsonl"
        lines = Path("data/reviews.jsonl").read_text().splitlines(keepends=True)
        rows.write_text("".join(lines[: args.rows]))
        job.append(f"data.train_files=[{rows}]")
    cfg = SweepConfig(
        name=name,
        job="configs/quickstart.yaml",
        overrides=job,
        space=space(args.lrs, args.ranks),
        search="grid",
        num_trials=1,
        max_concurrent_trials=2,
        scheduler=scheduler,
        storage_path=storage,
    )
    start = time.perf_counter()
    summary = run_sweep(cfg, resume=False)
    summary["bench_wall_s"] = time.perf_counter() - start
    return summary


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/tiny-llama")
    ap.add_argument("--lrs", type=positive, default=3, help="learning rates in the grid")
    ap.add_argument("--ranks", type=ranks, default=[4, 16], help="LoRA ranks in the grid: 4,16")
    ap.add_argument("--max-steps", type=positive, default=90, help="each trial's training steps")
    ap.add_argument("--rows", type=positive, default=None, help="the first N rows of the data")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grid = sweep("grid", {"type": "none"}, tmp, args)
        asha = sweep("asha", {"type": "asha", "grace_period": 1, "reduction_factor": 3}, tmp, args)
    print_comparison(grid, asha)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number >= 1")
    return int(text)


def ranks(text: str) -> list[int]:
    return [positive(r) for r in text.split(",")]


def print_comparison(grid: dict, asha: dict) -> None:
    print(f"\n{'':8} {'steps':>7} {'best eval loss':>15} {'wall s':>8}")
    for name, s in (("grid", grid), ("asha", asha)):
        best = s["best"]["best_eval_loss"] if s["best"] else float("nan")
        print(f"{name:8} {s['total_steps']:>7} {best:>15.4f} {s['bench_wall_s']:>8.0f}")
    if not (grid["total_steps"] and grid["best"] and asha["best"]):
        print("ASHA / grid: no ratio (a sweep trained no step; see the trials' errors above)")
        return
    steps = asha["total_steps"] / grid["total_steps"]
    loss = asha["best"]["best_eval_loss"] / grid["best"]["best_eval_loss"]
    print(
        f"ASHA / grid: steps {steps:.2f} (target <= 0.40), "
        f"best eval loss {loss:.3f} (target <= 1.01)"
    )
    stopped = sum(t["stopped_early"] for t in asha["trials"])
    print(f"trials stopped early by ASHA: {stopped}/{len(asha['trials'])}")


if __name__ == "__main__":
    main()
