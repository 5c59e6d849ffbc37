"""Memory options: peak memory and tokens/s of training steps under each option, against its
baseline, in one run.

    python benchmarks/memory_options_bench.py                       # ~3 minutes on 2 quiet CPUs
    python benchmarks/memory_options_bench.py --device cuda         # on a GPU
    python benchmarks/memory_options_bench.py --hidden 64 --layers 1 --seq 32 --steps 2 --rounds 1 \
        --options offloading,fsdp+cpu_offload                       # smoke

A Llama of --hidden x --layers built here trains --steps optimizer steps of --batch x --seq
random tokens, with the model, LoRA, memory options and strategy that the recipe builds
(jobs.finetune.setup), each run in a fresh process started by this script, options interleaved
round by round; each option's best round (fastest; its memory alongside) is shown.

LoRA rows (baseline: none): activation checkpointing, activation offloading, both.
Full fine-tune rows (baseline: FSDP2 on one rank, a gloo group in the process): FSDP2 with its
parameters, gradients and optimizer state offloaded to the CPU (train.fsdp.cpu_offload).

Memory: on a GPU the peak CUDA memory allocated during the steps; on the CPU the process's peak
RSS over its RSS once the model and optimizer were built (what the steps added: activations,
gradients, optimizer state). On the CPU the offloading options move nothing, since the device is
the host: their rows measure only their overhead. Losses are checked equal across each group.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jobs/, not an installed copy

LORA = {
    "none": [],
    "checkpointing": ["train.gradient_checkpointing=true"],
    "offloading": ["train.activation_offloading=true"],
    "checkpointing+offloading": [
        "train.gradient_checkpointing=true",
        "train.activation_offloading=true",
    ],
}
FULL = {
    "fsdp": ["lora=null", "train.strategy=fsdp"],
    "fsdp+cpu_offload": ["lora=null", "train.strategy=fsdp", "train.fsdp.cpu_offload=true"],
}
OPTIONS = {**LORA, **FULL}


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(args: argparse.Namespace) -> dict:
    """The worker: `args.worker`'s option, --steps steps; tokens/s (step 1 left out), the
    memory the steps added, the losses."""
    import torch

    from jobs.config import load_config
    from jobs.finetune import StepPlan, setup
    from jobs.parallel import job_runtime

    overrides = OPTIONS[args.worker]
    cuda = args.device == "cuda"
    cfg = load_config(
        ROOT / "configs/quickstart.yaml",
        [
            f"model.name_or_path={args.model}",
            "lora.dropout=0",
            "train.gradient_checkpointing=false",
            "scaling.cpus_per_worker=2",
            f"scaling.use_gpu={str(cuda).lower()}",
            *overrides,
        ],
    )
    device = torch.device(args.device)
    rt = job_runtime(cfg, device)
    _, par = setup(cfg, rt, StepPlan(args.steps, args.steps, 0))
    par.model.train()  # checkpointing (transformers) applies in training mode only
    ids = torch.randint(10, 600, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = 0.0 if cuda else peak_mb(device)  # the CPU's peak RSS so far: the built model
    losses, seconds = [], 0.0
    for step in range(args.steps):
        start = time.perf_counter()
        with rt.autocast():
            loss = par.model(input_ids=ids, labels=ids).loss
        par.backward(loss, last=True)
        par.step(cfg.train.max_grad_norm)
        losses.append(loss.item())  # waits for the device
        if step > 0:
            seconds += time.perf_counter() - start
    tokens = args.batch * args.seq * (args.steps - 1)
    return {"tokens_per_s": tokens / seconds, "step_mb": peak_mb(device) - before, "losses": losses}


def worker_main(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    fsdp = args.worker in FULL
    if fsdp:  # FSDP2 needs a process group: one rank
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        print(json.dumps(train(args)))
    finally:
        if fsdp:
            dist.destroy_process_group()


def run_worker(args: argparse.Namespace, option: str) -> dict:
    argv = [sys.executable, __file__, "--worker", option, "--model", str(args.model)]
    for key in ("device", "batch", "seq", "steps"):
        argv += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{option} worker failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base >= 1 else "n/a"  # nothing measurable added


def report(best: dict[str, dict], memory: str) -> None:
    """A row per option, its ratios against its group's baseline (the first option run)."""
    print(f"| option | tokens/s | {memory} MiB | tokens/s vs baseline | memory vs baseline |")
    print("|---|---|---|---|---|")
    for group in ([n for n in options if n in best] for options in (LORA, FULL)):
        if not group:
            continue
        base = best[group[0]]
        for name in group:
            r = best[name]
            print(
                f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_mb']:,.0f} | "
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                f"{ratio(r['step_mb'], base['step_mb'])} |"
            )
        diff = max(
            abs(a - b) / abs(b)
            for name in group
            for a, b in zip(best[name]["losses"], base["losses"], strict=True)
        )
        print(f"losses against {group[0]}: max relative difference {diff:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps; the first is not timed")
    p.add_argument("--rounds", type=int, default=2, help="options interleaved; the best counts")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--options", default=",".join(OPTIONS), help="a comma-separated subset")
    p.add_argument("--worker", choices=list(OPTIONS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps: at least 2 (the first is not timed)")
    if args.worker:
        return worker_main(args)
    options = args.options.split(",")
    if unknown := set(options) - set(OPTIONS):
        p.error(f"--options: unknown {sorted(unknown)}; known: {', '.join(OPTIONS)}")
    from jobs.tiny_model import main as build_model

    with tempfile.TemporaryDirectory() as tmp:
        args.model = Path(tmp) / "model"
        build_model(args.model, seed=0, hidden=args.hidden, layers=args.layers)
        print(
            f"{args.steps} steps of {args.batch} x {args.seq} tokens on {args.device}, model "
            f"hidden {args.hidden} x {args.layers} layers, {args.rounds} round(s) interleaved"
        )
        rounds = [{name: run_worker(args, name) for name in options} for _ in range(args.rounds)]
    best = {
        name: max((r[name] for r in rounds), key=lambda r: r["tokens_per_s"]) for name in options
    }
    cuda = args.device == "cuda"
    report(best, "peak CUDA allocated in the steps" if cuda else "peak RSS added by the steps")


if __name__ == "__main__":
    main()
