"""GRPO's rollouts: tokens/s, trainer step time and the share of wall time spent generating, for
the hf engine and (where installed) vLLM, synchronous vs `rollout.async_steps: 1`.

    python benchmarks/grpo_bench.py [--steps 12] [--rounds 2]
    python benchmarks/grpo_bench.py --steps 2 --rounds 1 --modes sync     # smoke

Each variant is a real `jobs.finetune` GRPO job (configs/grpo.yaml on the tiny model, no warm
start, 8 prompts x 8 completions of up to --max-tokens a step) on one local Ray, its trainer in
this process (scaling.local: what is compared is the rollouts, on their Ray actors); rounds take
turns over the variants so that a change in the machine's load hits all of them. Per variant,
from run.json's step records (step 1 left out: it pays the first load): rollout tokens/s (the
completion tokens over the time the trainer waited for them), the median step's generation and
training time, the share of wall time in generation (waiting, for async), and steps/s; the
median over rounds. Ratios are against hf sync.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variants(engines: list[str], modes: list[str]) -> list[tuple[str, str, int]]:
    out = []
    for engine in engines:
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            print("vllm is not installed: its rows are left out")
            continue
        out += [(f"{engine} {mode}", engine, int(mode == "async")) for mode in modes]
    return out


def run_variant(engine: str, async_steps: int, args, workdir: Path, name: str) -> dict:
    from jobs.config import load_config
    from jobs.finetune import run_job

    cfg = load_config(
        ROOT / "configs/grpo.yaml",
        [
            f"model.name_or_path={args.model}",
            f"checkpoint.storage_path={workdir}",
            f"run.name={name}",
            f"data.train_files=[{ROOT / 'data/review_prompts.jsonl'}]",
            "lora.init_from=null",
            f"train.max_steps={args.steps}",
            "eval.every_steps=null",
            "eval.max_generate_samples=8",
            "checkpoint.every_steps=null",
            f"train.grpo.max_completion_length={args.max_tokens}",
            f"rollout.engine={engine}",
            f"rollout.async_steps={async_steps}",
            "scaling.local=true",  # the trainer in this process, the rollouts on Ray actors
        ],
    )
    t0 = time.perf_counter()
    summary = run_job(cfg)
    return measure(summary["loss_history"][1:], time.perf_counter() - t0)


def measure(steps: list[dict], wall: float) -> dict:
    tokens = sum(h["completion_length"] * 64 for h in steps)  # 8 prompts x 8 completions
    gen = sum(h["generation_s"] for h in steps)
    busy = sum(h["generation_s"] + h["grading_s"] + h["training_s"] for h in steps)
    return {
        "tokens_per_s": tokens / max(gen, 1e-9),
        "gen_s": statistics.median(h["generation_s"] for h in steps),
        "train_s": statistics.median(h["training_s"] for h in steps),
        "gen_share": gen / max(busy, 1e-9),
        "steps_per_s": len(steps) / max(busy, 1e-9),
        "job_wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--modes", default="sync,async", help="rollout.async_steps 0 and/or 1")
    parser.add_argument("--model", default=str(ROOT / ".cache/tiny-llama"))
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        import subprocess

        subprocess.run([sys.executable, "-m", "jobs.tiny_model", args.model], check=True)
    from core.ray_cluster import shutdown_ray, start_local_ray

    start_local_ray(num_cpus=2)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label, engine, async_steps in variants(
                args.engines.split(","), args.modes.split(",")
            ):
                name = f"{label.replace(' ', '-')}-{r}"
                results.setdefault(label, []).append(
                    run_variant(engine, async_steps, args, Path(tmp), name)
                )
    shutdown_ray()
    print_table(results)


def print_table(results: dict[str, list[dict]]) -> None:
    def med(label, key):
        return statistics.median(r[key] for r in results[label])

    print("| variant | rollout tok/s | gen s/step | train s/step | gen share | steps/s |")
    print("|---|---|---|---|---|---|")
    for label in results:
        print(
            f"| {label} | {med(label, 'tokens_per_s'):,.0f} | {med(label, 'gen_s'):.3f} | "
            f"{med(label, 'train_s'):.3f} | {med(label, 'gen_share'):.0%} | "
            f"{med(label, 'steps_per_s'):.2f} |"
        )
    base = med("hf sync", "steps_per_s")
    for label in results:
        if label != "hf sync":
            print(f"steps/s {label} / hf sync = {med(label, 'steps_per_s') / base:.2f}")


if __name__ == "__main__":
    main()
