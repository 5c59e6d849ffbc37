"""ASHA vs the full grid on the same space and job: training steps consumed and best eval loss.

    python benchmarks/sweep_bench.py            # ~10 minutes on 2 CPUs (tiny model, 6 configs)
    python benchmarks/sweep_bench.py --lrs 6    # 12 configs, ~20 minutes

Both sweeps run the same 6 grid points of the quickstart job (lora.r x train.lr), two trials at a
time; the grid runs every trial to the end, ASHA stops trials at their evals. Target: ASHA uses
<= 40% of the grid's steps with a best eval loss at most 1% worse.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

from tune.sweep import SweepConfig, run_sweep


def space(n_lr: int) -> dict:
    """lora.r in {4, 16} x n_lr learning rates log-spaced over [1e-4, 3e-3] (3: 3e-4, 1e-3, 3e-3)."""
    if n_lr == 3:
        lrs = [3.0e-4, 1.0e-3, 3.0e-3]
    else:
        lrs = [round(1e-4 * 30 ** (i / (n_lr - 1)), 6) for i in range(n_lr)]
    return {"lora.r": {"grid": [4, 16]}, "train.lr": {"grid": lrs}}


OVERRIDES = [
    "scaling.cpus_per_worker=1",
    "train.max_steps=90",
    "eval.every_steps=10",
    "checkpoint.every_steps=10",
    "eval.early_stopping_patience=null",
    "eval.max_generate_samples=16",
]


def sweep(name: str, scheduler: dict, storage: str, model: str, n_lr: int) -> dict:
    cfg = SweepConfig(
        name=name,
        job="configs/quickstart.yaml",
        overrides=[*OVERRIDES, f"model.name_or_path={model}"],
        space=space(n_lr),
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
    ap.add_argument("--lrs", type=int, default=3, help="learning rates in the grid (x 2 ranks)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grid = sweep("grid", {"type": "none"}, tmp, args.model, args.lrs)
        asha = sweep(
            "asha",
            {"type": "asha", "grace_period": 1, "reduction_factor": 3},
            tmp,
            args.model,
            args.lrs,
        )
    print(f"\n{'':8} {'steps':>7} {'best eval loss':>15} {'wall s':>8}")
    for name, s in (("grid", grid), ("asha", asha)):
        print(
            f"{name:8} {s['total_steps']:>7} {s['best']['best_eval_loss']:>15.4f} {s['bench_wall_s']:>8.0f}"
        )
    steps = asha["total_steps"] / grid["total_steps"]
    loss = asha["best"]["best_eval_loss"] / grid["best"]["best_eval_loss"]
    print(
        f"ASHA / grid: steps {steps:.2f} (target <= 0.40), best eval loss {loss:.3f} (target <= 1.01)"
    )
    print(
        f"trials stopped early by ASHA: {sum(t['stopped_early'] for t in asha['trials'])}/{len(asha['trials'])}"
    )


if __name__ == "__main__":
    main()
