r"""What ASHA and TPE save: the full grid vs ASHA on it, and random vs TPE search at one step budget.

    python benchmarks/sweep_bench.py          # ~25 minutes on 2 CPUs (tiny model, 12 configs)
    python benchmarks/sweep_bench.py --ranks 4 --alphas 8 --lrs 1e-3 --max-steps 2 --rows 200 \
        --trials 1 --searchers optuna   # smoke

In one run, on the quickstart job (each trial trains in its own process with one CPU,
scaling.local, two at a time):
1. the full grid, lora.r x lora.alpha x train.lr (12 points), every trial to its end (FIFO);
2. Ray's ASHA bracket replayed on the grid's measured eval curves for several grace periods and
   reduction factors, over 100 shuffled trial orders: the evidence for the shipped settings;
3. ASHA on the same grid with those settings (grace 1 eval, reduction factor 4, shuffled order);
4. random search and TPE (optuna), both with ASHA, on the continuous space (lr log-uniform over
   the grid's range) and the same budget of training steps (40% of the grid's): the best eval
   loss each reaches.
Targets: ASHA <= 40% of the grid's steps with a best eval loss <= 1.01x the grid's.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

from tune.search import replay_asha
from tune.sweep import SweepConfig, run_sweep

SEARCHERS = ("random", "optuna")  # step 4's, compared at one budget
GRACE, REDUCTION = 1, 4  # the settings step 2 argues for (and configs/sweep_reviews.yaml ships)


def grid_space(args: argparse.Namespace) -> dict:
    return {
        "lora.r": {"grid": args.ranks},
        "lora.alpha": {"grid": args.alphas},
        "train.lr": {"grid": args.lrs},
    }


def sampled_space(args: argparse.Namespace) -> dict:
    """The grid's range, sampled: ranks and alphas as choices, the learning rate log-uniform."""
    low, high = min(args.lrs), max(args.lrs)
    lr = {"loguniform": [low, high]} if low < high else {"choice": [low]}
    return {"lora.r": {"choice": args.ranks}, "lora.alpha": {"choice": args.alphas}, "train.lr": lr}


def overrides(max_steps: int) -> list[str]:
    """The quickstart job, shortened: 9 evals (and checkpoints) over max_steps, where ASHA stops.
    Each trial trains in its own process (scaling.local): what is compared is steps and losses,
    and a trial's Ray Train workers would only add their start-up to the wall time."""
    every = max(1, max_steps // 9)
    return [
        "scaling.cpus_per_worker=1",
        "scaling.local=true",
        f"train.max_steps={max_steps}",
        f"eval.every_steps={every}",
        f"checkpoint.every_steps={every}",
        "eval.early_stopping_patience=null",
        "eval.max_generate_samples=16",
    ]


def sweep(name: str, storage: str, args: argparse.Namespace, **fields) -> dict:
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
        max_concurrent_trials=2,
        storage_path=storage,
        **fields,
    )
    start = time.perf_counter()
    summary = run_sweep(cfg, resume=False)
    summary["bench_wall_s"] = time.perf_counter() - start
    return summary


def asha(grace: int = GRACE, reduction: float = REDUCTION) -> dict:
    return {"type": "asha", "grace_period": grace, "reduction_factor": reduction}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grid = sweep(
            "grid",
            tmp,
            args,
            space=grid_space(args),
            search="grid",
            num_trials=1,
            scheduler={"type": "none"},
        )
        print_replay(grid, args)
        on_grid = sweep(
            "asha", tmp, args, space=grid_space(args), search="grid", num_trials=1, scheduler=asha()
        )
        print_comparison(grid, on_grid)
        budget = max(1, int(0.4 * grid["total_steps"]))  # ASHA's target share of the grid
        searched = {
            search: sweep(
                search,
                tmp,
                args,
                space=sampled_space(args),
                search=search,
                num_trials=args.trials,
                scheduler=asha(),
                budget={"steps": budget},
            )
            for search in args.searchers
        }
    print_searchers(searched, budget)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/tiny-llama")
    ap.add_argument("--ranks", type=numbers(int), default=[8, 32], help="LoRA ranks: 8,32")
    ap.add_argument("--alphas", type=numbers(int), default=[16, 32], help="LoRA alphas: 16,32")
    ap.add_argument("--lrs", type=numbers(float), default=[2e-4, 1e-3, 5e-3], help="2e-4,1e-3,5e-3")
    ap.add_argument("--max-steps", type=numbers(int), default=[90], help="each trial's steps")
    ap.add_argument("--rows", type=numbers(int), default=None, help="the first N rows of the data")
    ap.add_argument("--trials", type=numbers(int), default=[24], help="random/TPE samples")
    ap.add_argument(
        "--searchers", type=searchers, default=list(SEARCHERS), help="step 4's: random,optuna"
    )
    args = ap.parse_args()
    args.max_steps, args.trials = args.max_steps[0], args.trials[0]
    args.rows = args.rows[0] if args.rows else None
    return args


def searchers(text: str) -> list[str]:
    names = text.split(",")
    if unknown := set(names) - set(SEARCHERS):
        raise argparse.ArgumentTypeError(
            f"{sorted(unknown)}: the searchers are {', '.join(SEARCHERS)}"
        )
    return names


def numbers(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: comma-separated {kind.__name__}s"
            ) from None
        if any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be > 0")
        return values

    return parse


def curves(summary: dict) -> list[list[tuple[int, float]]]:
    return [[(int(s), loss) for s, loss in t["evals"]] for t in summary["trials"] if t["evals"]]


def replay(measured, grace_steps: int, reduction: float, max_t: int, orders: int = 100):
    """ASHA replayed on the measured curves in `orders` shuffled orders: the medians of its steps
    and best loss as fractions of the grid's, and how often both targets were met."""
    grid_steps = sum(c[-1][0] for c in measured)
    grid_best = min(loss for c in measured for _, loss in c)
    steps, losses, met = [], [], 0
    for seed in range(orders):
        order = random.Random(seed).sample(measured, len(measured))
        trained = replay_asha(order, grace_steps, reduction, 2, max_t)
        best = min(loss for c, t in zip(order, trained, strict=True) for s, loss in c if s <= t)
        steps.append(sum(trained) / grid_steps)
        losses.append(best / grid_best)
        met += steps[-1] <= 0.40 and losses[-1] <= 1.01
    return statistics.median(steps), statistics.median(losses), met / orders


def print_replay(grid: dict, args: argparse.Namespace) -> None:
    measured = curves(grid)
    if not measured:
        print("replay: the grid reported no eval")
        return
    every, max_t = measured[0][0][0], args.max_steps + 1
    print("\nASHA replayed on the grid's eval curves (100 shuffled orders, 2 trials at a time)")
    print(f"{'grace (evals)':>13} {'rf':>4} {'steps/grid':>11} {'best/grid':>10} {'both met':>9}")
    for grace in (1, 2, 3):
        for reduction in (2, 3, 4, 6):
            if grace * every >= max_t:
                continue
            steps, loss, met = replay(measured, grace * every, reduction, max_t)
            print(f"{grace:>13} {reduction:>4} {steps:>11.2f} {loss:>10.3f} {met:>9.0%}")


def print_comparison(grid: dict, asha_run: dict) -> None:
    print(f"\n{'':8} {'steps':>7} {'best eval loss':>15} {'wall s':>8}")
    for name, s in (("grid", grid), ("asha", asha_run)):
        best = s["best"]["best_eval_loss"] if s["best"] else float("nan")
        print(f"{name:8} {s['total_steps']:>7} {best:>15.4f} {s['bench_wall_s']:>8.0f}")
    if not (grid["total_steps"] and grid["best"] and asha_run["best"]):
        print("ASHA / grid: no ratio (a sweep trained no step; see the trials' errors above)")
        return
    steps = asha_run["total_steps"] / grid["total_steps"]
    loss = asha_run["best"]["best_eval_loss"] / grid["best"]["best_eval_loss"]
    print(
        f"ASHA / grid: steps {steps:.2f} (target <= 0.40), "
        f"best eval loss {loss:.3f} (target <= 1.01)"
    )
    stopped = sum(t["stopped_early"] for t in asha_run["trials"])
    print(f"trials stopped early by ASHA: {stopped}/{len(asha_run['trials'])}")


def print_searchers(searched: dict, budget: int) -> None:
    print(f"\nrandom vs TPE, both with ASHA, at a budget of {budget} steps")
    print(f"{'search':8} {'trials':>7} {'steps':>7} {'best eval loss':>15} {'wall s':>8}")
    for name, s in searched.items():
        best = s["best"]["best_eval_loss"] if s["best"] else float("nan")
        trials = len(s["trials"])
        print(f"{name:8} {trials:>7} {s['total_steps']:>7} {best:>15.4f} {s['bench_wall_s']:>8.0f}")


if __name__ == "__main__":
    main()
