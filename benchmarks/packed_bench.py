"""4 LoRA trials packed on one base model (jobs/packed_trials.py) vs the same 4 trials run separately.

    python benchmarks/packed_bench.py              # ~8 minutes on 2 quiet CPUs (2 rounds)
    python benchmarks/packed_bench.py --sweeps     # and the same as 2 Ray Tune sweeps, ~+5 min
    python benchmarks/packed_bench.py --max-steps 2 --rows 120 --hidden 64 --layers 1 --repeats 1  # smoke

Both sides train the same 4 configs (lora.r, lora.alpha, train.lr differ) for the same
steps with an eval every --eval-every steps, on a Llama of --hidden x --layers built here, in
fresh processes started by this script, one at a time:

separate  one process per trial, the normal recipe without Ray (jobs.finetune.setup,
          StepBatches, the SFT train_step, Objective.evaluate): each loads the libraries, the
          data and the base model. Its memory is each process's peak RSS; 4 trials running at
          once (a sweep with 4 concurrent trials on one machine) would hold their sum.
packed    one process: the data and base once, a PackedTrainer with 4 slots, joint steps and
          batched evals until every slot is done. Peak RSS of that process.

Wall time is each process's whole life as seen from here (start-up, data, model, training); the
loop time is training and evals only. Targets: packed wall <= 0.6x the separate trials' total,
packed peak RSS about one separate trial's (one base model, not four). The packed losses are
checked against the separate ones (rel 1e-4). Ray's own cost (a sweep's trial actors, Ray
Train's workers) is left out on both sides; `--sweeps` adds it: the same trials as a normal
sweep (one Ray Train job per trial) and as a packed one (tune.packed_trials), end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jobs/, not an installed copy
CONFIGS = [
    ["lora.r=4", "lora.alpha=16", "train.lr=2e-3"],
    ["lora.r=8", "lora.alpha=16", "train.lr=1e-3"],
    ["lora.r=16", "lora.alpha=32", "train.lr=5e-4"],
    ["lora.r=32", "lora.alpha=32", "train.lr=3e-4"],
]


def job(args: argparse.Namespace, extra: list[str]):
    from jobs.config import load_config

    return load_config(
        ROOT / "configs/quickstart.yaml",
        [
            f"model.name_or_path={args.model}",
            f"data.train_files=[{args.data}]",
            "lora.dropout=0",
            f"train.max_steps={args.max_steps}",
            f"eval.every_steps={args.eval_every}",
            "scaling.cpus_per_worker=2",
            *extra,
        ],
    )


def load(cfg):
    from inference.model import load_tokenizer
    from jobs.data import load_for_job

    with tempfile.TemporaryDirectory() as scratch:
        data = load_for_job(cfg, load_tokenizer(cfg.model), scratch)
    return {"train": data.train, "eval": data.eval, "eval_conversations": []}


def separate_trial(args: argparse.Namespace) -> dict:
    """One trial, the normal recipe (no Ray): its losses and evals."""
    import torch

    from inference.runtime import Runtime
    from jobs.finetune import StepBatches, plan_steps, setup
    from jobs.objectives import make_objective

    cfg, rt = job(args, CONFIGS[args.trial]), Runtime(torch.device("cpu"))
    data = load(cfg)
    start = time.perf_counter()
    plan = plan_steps(len(data["train"]), cfg)
    tokenizer, par = setup(cfg, rt, plan)
    obj = make_objective(cfg, rt, tokenizer, data)
    batches = StepBatches(cfg, rt, obj, plan)
    losses, evals = [], []
    for step in range(plan.total_steps):
        losses.append(obj.train_step(par, batches.micro_batches(step)).loss)
        if (step + 1) % args.eval_every == 0:
            evals.append(obj.evaluate(par, full=False)["eval_loss"])
    return {"loop_s": time.perf_counter() - start, "losses": [losses], "evals": [evals]}


def packed_trials(args: argparse.Namespace) -> dict:
    """All trials in one PackedTrainer: their losses and evals, in CONFIGS order."""
    import torch

    from inference.model import load_base_model, load_tokenizer
    from inference.runtime import Runtime
    from jobs.packed_trials import PackedTrainer

    cfgs, rt = [job(args, extra) for extra in CONFIGS], Runtime(torch.device("cpu"))
    data = load(cfgs[0])
    start = time.perf_counter()
    torch.set_num_threads(2)  # as setup() does for the separate trials
    base = load_base_model(cfgs[0].model, rt.device)
    trainer = PackedTrainer(cfgs[0], rt, load_tokenizer(cfgs[0].model), base, data)
    names = [f"trial{i}" for i in range(len(cfgs))]
    for name, cfg in zip(names, cfgs, strict=True):
        trainer.add(name, cfg)
    out = {n: {"losses": [], "evals": []} for n in names}
    while live := [n for n in names if not trainer.done(n)]:
        for name, result in trainer.train_step(live).items():
            out[name]["losses"].append(result.loss)
        due = [n for n in live if trainer.slots[n].state.step % args.eval_every == 0]
        for name, loss in (trainer.eval_losses(due) if due else {}).items():
            out[name]["evals"].append(loss)
    return {
        "loop_s": time.perf_counter() - start,
        "losses": [out[n]["losses"] for n in names],
        "evals": [out[n]["evals"] for n in names],
    }


def run_worker(args: argparse.Namespace, mode: str, trial: int = 0) -> dict:
    """This script in a fresh process (`--worker`); its result, wall time and peak RSS."""
    argv = [sys.executable, __file__, "--worker", mode, "--trial", str(trial)]
    for key in ("model", "data", "max_steps", "eval_every"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} worker failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": wall}


def worker_main(args: argparse.Namespace) -> None:
    result = separate_trial(args) if args.worker == "separate" else packed_trials(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def max_rel_diff(a: list[list[float]], b: list[list[float]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def report(separate: list[dict], packed: dict) -> None:
    total_wall = sum(r["wall_s"] for r in separate)
    total_loop = sum(r["loop_s"] for r in separate)
    rss = [r["peak_rss_mb"] for r in separate]
    print("| run | wall s | train+eval loop s | peak RSS MB |")
    print("|---|---|---|---|")
    for i, r in enumerate(separate):
        print(
            f"| separate trial {i} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    print(
        f"| 4 separate, total | {total_wall:.1f} | {total_loop:.1f} | max {max(rss):.0f}, sum {sum(rss):.0f} |"
    )
    print(
        f"| 4 packed | {packed['wall_s']:.1f} | {packed['loop_s']:.1f} | {packed['peak_rss_mb']:.0f} |"
    )
    losses = max_rel_diff(packed["losses"], [r["losses"][0] for r in separate])
    evals = (
        max_rel_diff(packed["evals"], [r["evals"][0] for r in separate])
        if packed["evals"][0]
        else 0
    )
    print(f"packed / separate wall time: {packed['wall_s'] / total_wall:.2f}x (target <= 0.6x)")
    print(f"packed / separate loop time: {packed['loop_s'] / total_loop:.2f}x")
    print(
        f"packed peak RSS / one separate trial's: {packed['peak_rss_mb'] / max(rss):.2f}x "
        f"(target ~1x: one base), / 4 concurrent trials' sum: {packed['peak_rss_mb'] / sum(rss):.2f}x"
    )
    print(
        f"packed vs separate: max relative difference {losses:.1e} in losses, {evals:.1e} in evals (target <= 1e-4)"
    )


def sweeps(args: argparse.Namespace, tmp: str) -> None:
    """4 trials (lora.r 4, 8, 16, 32) as Ray Tune sweeps, FIFO (every trial runs every step):
    one Ray Train job per trial, 2 at a time on 1 CPU each (configs/sweep_reviews.yaml's
    layout), vs pack_trials 4 on one 2-CPU host. Peak RSS: each trial's run.json
    (worker_peak_rss_mb: its Train worker, or the pack host that trained it)."""
    import ray

    from core.ray_cluster import start_local_ray
    from tune.sweep import SweepConfig, run_sweep

    job = [
        f"model.name_or_path={args.model}",
        f"data.train_files=[{args.data}]",
        "lora.dropout=0",
        f"train.max_steps={args.max_steps}",
        f"eval.every_steps={args.eval_every}",
        "eval.early_stopping_patience=null",
        "eval.max_generate_samples=16",
    ]
    layouts = {
        "separate": ({"max_concurrent_trials": 2}, ["scaling.cpus_per_worker=1"]),
        "packed": ({"max_concurrent_trials": 4, "pack_trials": 4}, ["scaling.cpus_per_worker=2"]),
    }
    start_local_ray(num_cpus=2)
    rows = {}
    for name, (fields, extra) in layouts.items():
        cfg = SweepConfig(
            name=name,
            job=str(ROOT / "configs/quickstart.yaml"),
            overrides=[*job, *extra],
            space={"lora.r": {"grid": [4, 8, 16, 32]}},
            search="grid",
            num_trials=1,
            scheduler={"type": "none"},
            storage_path=str(Path(tmp) / "sweeps"),
            **fields,
        )
        start = time.perf_counter()
        summary = run_sweep(cfg, resume=False)
        wall = time.perf_counter() - start
        runs = [
            json.loads((Path(t["run_dir"]) / "run.json").read_text()) for t in summary["trials"]
        ]
        rss = [r["worker_peak_rss_mb"][0] for r in runs]
        rows[name] = (wall, max(rss), sum(rss) if name == "separate" else max(rss))
    ray.shutdown()
    print("| sweep (Ray Tune, 4 trials) | wall s | peak RSS MB: one trial's | all trials' |")
    print("|---|---|---|---|")
    for name, (wall, one, total) in rows.items():
        print(f"| {name} | {wall:.1f} | {one:.0f} | {total:.0f} |")
    sep, pk = rows["separate"], rows["packed"]
    print(f"packed / separate sweep wall time: {pk[0] / sep[0]:.2f}x (target <= 0.6x)")
    print(f"packed host RSS / separate trials' RSS summed: {pk[2] / sep[2]:.2f}x")


def best_of(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """--repeats rounds, separate and packed interleaved; each run's fastest round (a shared
    machine's load comes and goes: one busy minute must not decide the ratio)."""
    rounds = []
    for _ in range(args.repeats):
        separate = [run_worker(args, "separate", i) for i in range(len(CONFIGS))]
        rounds.append((separate, run_worker(args, "packed")))
    fastest = [
        min((r[0][i] for r in rounds), key=lambda x: x["wall_s"]) for i in range(len(CONFIGS))
    ]
    return fastest, min((r[1] for r in rounds), key=lambda x: x["wall_s"])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--rows", type=int, default=0, help="first ROWS of the quickstart data (0: all)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="rounds; each run's fastest counts")
    p.add_argument("--sweeps", action="store_true", help="also the same trials as 2 Ray sweeps")
    p.add_argument("--worker", choices=["separate", "packed"], help=argparse.SUPPRESS)
    p.add_argument("--trial", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    from jobs.tiny_model import main as build_model

    with tempfile.TemporaryDirectory() as tmp:
        args.model = Path(tmp) / "model"
        build_model(args.model, seed=0, hidden=args.hidden, layers=args.layers)
        lines = (ROOT / "data/reviews.jsonl").read_text().splitlines(keepends=True)
        args.data = Path(tmp) / "reviews.jsonl"
        args.data.write_text("".join(lines[: args.rows] if args.rows else lines))
        args.eval_every = min(args.eval_every, args.max_steps)
        print(
            f"{len(CONFIGS)} trials x {args.max_steps} steps, model hidden {args.hidden} x {args.layers} layers"
        )
        separate, packed = best_of(args)
        report(separate, packed)
        if args.sweeps:
            sweeps(args, tmp)


if __name__ == "__main__":
    main()
