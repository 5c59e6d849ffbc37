"""Training throughput on CPU: packing vs padding, our step vs TRL's SFTTrainer, memory per strategy.

    python benchmarks/train_bench.py                  # all three, ~10 minutes on 2 CPUs (measured: 1+7+3 min)
    python benchmarks/train_bench.py --part packing   # or trl, or memory

packing  the same LoRA steps over a length-skewed chat set (most rows short, a few long), padded
         to each micro-batch's longest row vs packed into rows of max_seq_len. Tokens/s counts
         real tokens only. Target: packed >= 2x padded.
trl      our training step (jobs.objectives.sft.train_step) vs TRL's SFTTrainer on the same model,
         LoRA config, pre-tokenized rows in the same order, batch size, steps, precision (fp32),
         clipping and threads, both in this process (no Ray; Ray's own cost is measured by
         benchmarks/ray_overhead.py); best of --repeats interleaved rounds. Target: ours >= 1.0x.
         Also each run's peak RSS above its start (Linux), the least of the rounds. Target: ours
         <= 0.5x SFTTrainer's (which computes its loss with TRL's fused, chunked LM head).
memory   a 2-worker full fine-tune of a ~20M-parameter model under ddp / fsdp / zero2 / zero3 on
         Ray; each worker's peak RSS (run.json's worker_peak_rss_mb).

Every ratio compares runs made in this script on this machine: absolute numbers move with the
machine's load, ratios much less.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import resource
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from inference.runtime import Runtime
from jobs.batching import collate, pack
from jobs.config import JobConfig, load_config
from jobs.data.render import render_and_mask
from jobs.model import add_lora
from jobs.objectives.sft import train_step
from jobs.parallel import make_parallel
from jobs.tiny_model import build_model, build_tokenizer

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "it",
    "an",
    "be",
    "are",
    "or",
]


def skewed_conversations(n: int, seed: int = 0) -> list[dict]:
    """Chat rows whose lengths follow a long tail: the median ~40 tokens, the longest ~1000."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = min(int(rng.lognormvariate(3.0, 1.0)) + 4, 700)
        q = " ".join(rng.choice(WORDS) for _ in range(words))
        a = " ".join(rng.choice(WORDS) for _ in range(max(2, words // 3)))
        rows.append(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
    return rows


def setup(hidden: int, layers: int, tmp: Path):
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), hidden=hidden, layers=layers)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    return tokenizer, model


def job_config(model_dir: Path, storage: Path, *overrides: str) -> JobConfig:
    return load_config(
        "configs/quickstart.yaml",
        [f"model.name_or_path={model_dir}", f"checkpoint.storage_path={storage}", *overrides],
    )


class PeakRss:
    """Peak RSS above the start of a `with` block (Linux: the kernel's VmHWM, reset at entry
    through /proc/self/clear_refs); None elsewhere. Allocations above 64 KiB are mmapped
    (glibc's M_MMAP_THRESHOLD), so memory an earlier run freed is not reused from the heap
    without showing in RSS."""

    def __enter__(self):
        self.bytes = None
        self.ok = Path("/proc/self/clear_refs").exists()
        if self.ok:
            ctypes.CDLL(None).mallopt(-3, 65536)
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.start = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.ok:
            self.bytes = _proc_status("VmHWM") - self.start


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def our_steps(
    cfg: JobConfig, model, examples, steps: int, packing: bool, pad_id: int, max_grad_norm=None
) -> dict:
    """tokens/s of `steps` optimizer steps of jobs.objectives.sft.train_step (the first one excluded)."""
    torch.manual_seed(0)
    rt = Runtime(torch.device("cpu"))
    par = make_parallel(cfg, rt)
    par.setup(
        model,
        lambda p: torch.optim.AdamW(p, lr=cfg.train.lr),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
    )
    micro, per_step = cfg.train.micro_batch_size, cfg.train.effective_batch_size
    tokens, elapsed = 0, 0.0
    for s in range(steps + 1):
        chunk = examples[s * per_step : (s + 1) * per_step]
        batch = partial(pack, max_len=cfg.data.max_seq_len) if packing else collate
        batches = [batch(chunk[i : i + micro], pad_id=pad_id) for i in range(0, per_step, micro)]
        t0 = time.perf_counter()
        _, n = train_step(par, batches, rt, max_grad_norm)
        if s:  # the first step pays for allocation and lazy init
            elapsed += time.perf_counter() - t0
            tokens += n
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens}


def bench_packing(args, tmp: Path) -> None:
    tokenizer, _ = setup(args.hidden, args.layers, tmp)
    convs = skewed_conversations(args.steps * 32 + 32)
    examples = [render_and_mask(c["messages"], tokenizer, 512) for c in convs]
    lengths = sorted(len(e["input_ids"]) for e in examples)
    print(
        f"packing: {len(examples)} rows, tokens median {lengths[len(lengths) // 2]}, "
        f"p90 {lengths[int(len(lengths) * 0.9)]}, max {lengths[-1]}"
    )
    # rows of 512 tokens: on CPU, sdpa computes each packed row's whole (masked) attention
    # matrix, so rows much longer than the examples spend on attention what packing saved
    cfg = job_config(
        tmp / "model",
        tmp / "runs",
        "train.micro_batch_size=16",
        "train.effective_batch_size=32",
        "data.max_seq_len=512",
    )
    results = {}
    for name, packing in (("padded", False), ("packed", True)):
        _, model = setup(args.hidden, args.layers, tmp)
        model = add_lora(model, cfg.lora)
        results[name] = our_steps(cfg, model, examples, args.steps, packing, tokenizer.pad_token_id)
        r = results[name]
        print(
            f"  {name:7s} {r['tokens_per_s']:9,.0f} tok/s  ({r['tokens']:,} tokens in {r['seconds']:.1f} s)"
        )
    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"  packed / padded: {ratio:.2f}x  (target >= 2x)")


def step_timer():
    """A Trainer callback timing each optimizer step and counting its non-padding tokens."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.threads, self.t0 = [], [], set(), 0.0

        def on_step_begin(self, args, state, control, **k):
            self.threads.add(torch.get_num_threads())
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(int(state.num_input_tokens_seen))  # cumulative, non-padding

    return StepTimer()


def sft_config(cfg: JobConfig, steps: int, tmp: Path, bf16: bool):
    """SFTConfig matched to our step: micro-batch, accumulation, lr, clipping, no extras."""
    from trl import SFTConfig

    micro, per_step = cfg.train.micro_batch_size, cfg.train.effective_batch_size
    return SFTConfig(
        output_dir=str(tmp / "trl"),
        max_steps=steps + 1,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_step // micro,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_grad_norm=1.0,
        max_length=cfg.data.max_seq_len,
        train_sampling_strategy="sequential",
        bf16=bf16,
        fp16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=10**6,
        save_strategy="no",
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        seed=0,
        include_num_input_tokens_seen="non_padding",
    )


def trl_steps(
    cfg: JobConfig, model, tokenizer, examples, steps: int, tmp: Path, bf16: bool = False
) -> dict:
    """tokens/s of `steps` optimizer steps of TRL's SFTTrainer (the first one excluded), made as
    comparable to `our_steps` as its options allow: the same pre-tokenized rows and labels in
    the same order (sequential sampler), micro-batch and accumulation, fp32 (SFTConfig's bf16
    default is True: bf16 autocast on a CPU without bf16 units), gradient clipping at the same
    norm, constant lr, no dropout, no gradient checkpointing, no dataloader workers. Timed from
    the step's first forward to the end of its optimizer step; the batches are fetched and
    collated before that, like ours."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import SFTTrainer

    rows = examples[: (steps + 1) * cfg.train.effective_batch_size]
    timer = step_timer()
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(
            [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in rows]
        ),
        peft_config=PeftLoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        args=sft_config(cfg, steps, tmp, bf16),
        callbacks=[timer],
    )
    trainer.train()
    tokens = [b - a for a, b in zip([0, *timer.tokens], timer.tokens, strict=False)]
    seconds = sum(timer.times[1:])
    return {
        "tokens_per_s": sum(tokens[1:]) / seconds,
        "seconds": seconds,
        "tokens": sum(tokens[1:]),
        "threads": timer.threads,
    }


def bench_trl(args, tmp: Path) -> None:
    tokenizer, _ = setup(args.hidden, args.layers, tmp)
    convs = skewed_conversations((args.steps + 1) * 16, seed=1)
    # same rows both sides; lengths capped so that both truncate nothing
    cfg = job_config(
        tmp / "model",
        tmp / "runs",
        "train.micro_batch_size=8",
        "train.effective_batch_size=16",
        "data.max_seq_len=1024",
        "lora.dropout=0",
    )
    examples = [render_and_mask(c["messages"], tokenizer, 1024) for c in convs]
    print(
        f"trl: {args.steps} timed steps of 16 rows (2 x 8), {args.repeats} interleaved rounds, "
        f"torch threads {torch.get_num_threads()}"
    )
    best = {"ours": None, "trl": None}
    peaks: dict[str, list[int]] = {"ours": [], "trl": []}
    for r in range(args.repeats):
        for name in ("ours", "trl"):
            _, model = setup(args.hidden, args.layers, tmp)  # a fresh model each run
            with PeakRss() as peak:
                if name == "ours":
                    res = our_steps(
                        cfg,
                        add_lora(model, cfg.lora),
                        examples,
                        args.steps,
                        False,
                        tokenizer.pad_token_id,
                        max_grad_norm=1.0,
                    )
                else:
                    res = trl_steps(cfg, model, tokenizer, examples, args.steps, tmp, args.trl_bf16)
            extra = f", torch threads {sorted(res['threads'])}" if "threads" in res else ""
            mem = "" if peak.bytes is None else f", peak RSS +{peak.bytes / 2**20:,.0f} MiB"
            print(
                f"  round {r + 1} {name:4s} {res['tokens_per_s']:8,.0f} tok/s "
                f"({res['tokens']:,} tokens in {res['seconds']:.1f} s{extra}{mem})"
            )
            if best[name] is None or res["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = res
            if peak.bytes is not None:
                peaks[name].append(peak.bytes)
    ours, trl = best["ours"], best["trl"]
    if ours["tokens"] != trl["tokens"]:
        print(
            f"  WARNING: the timed steps saw different token counts: {ours['tokens']} vs {trl['tokens']}"
        )
    print(
        f"  best of {args.repeats}: ours {ours['tokens_per_s']:,.0f} tok/s, SFTTrainer "
        f"{trl['tokens_per_s']:,.0f} tok/s (same {ours['tokens']:,} non-padding tokens)"
    )
    print(
        f"  ours / SFTTrainer: {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x  (target >= 1.0x)"
    )
    if peaks["ours"] and peaks["trl"]:
        mine, theirs = min(peaks["ours"]), min(peaks["trl"])
        print(
            f"  peak RSS above the run's start (least of {args.repeats}): ours "
            f"{mine / 2**20:,.0f} MiB, SFTTrainer {theirs / 2**20:,.0f} MiB; "
            f"ours / SFTTrainer memory: {mine / theirs:.2f}x  (target <= 0.5x)"
        )


MEMORY_STRATEGIES = {
    "ddp": ["train.strategy=ddp"],
    "fsdp": ["train.strategy=fsdp"],
    "zero2": ["train.strategy=deepspeed", "train.deepspeed.stage=2"],
    "zero3": ["train.strategy=deepspeed", "train.deepspeed.stage=3"],
}


def bench_memory(args, tmp: Path) -> None:
    import ray

    from core.ray_cluster import start_local_ray
    from jobs.finetune import run_job

    tokenizer, model = setup(args.memory_hidden, args.memory_layers, tmp)
    n_params = sum(p.numel() for p in model.parameters())
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in skewed_conversations(160, seed=2)))
    start_local_ray(num_cpus=2)
    print(f"memory: full fine-tune of {n_params / 1e6:.0f}M params, 2 workers, peak RSS per worker")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for name in args.strategies.split(","):
            overrides = MEMORY_STRATEGIES[name]
            cfg = job_config(
                tmp / "model",
                tmp / "runs",
                f"run.name=mem-{name}",
                "lora=null",
                f"data.train_files=[{data}]",
                "data.length.min_tokens=1",
                "data.length.max_tokens=1024",
                "data.max_seq_len=512",
                "train.max_steps=3",
                "train.micro_batch_size=4",
                "train.effective_batch_size=8",
                "scaling.num_workers=2",
                "scaling.cpus_per_worker=1",
                "eval.every_steps=null",
                "eval.early_stopping_patience=null",
                "eval.task_metric=none",
                "checkpoint.every_steps=null",
                *overrides,
            )
            summary = run_job(cfg)
            rss = summary["worker_peak_rss_mb"]
            print(f"  {name:6s} peak RSS per worker: {', '.join(f'{r:,.0f}' for r in rss)} MiB")
    finally:
        ray.shutdown()
    print(f"  (driver process: {base:,.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["packing", "trl", "memory", "all"], default="all")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--trl-bf16", action="store_true", help="trl: SFTConfig's own default (bf16 on CPU)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="trl: interleaved rounds, best kept")
    parser.add_argument("--strategies", default=",".join(MEMORY_STRATEGIES), help="memory: which")
    parser.add_argument("--memory-hidden", type=int, default=512, help="memory: the model's width")
    parser.add_argument("--memory-layers", type=int, default=8, help="memory: its depth")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        for part, fn in (("packing", bench_packing), ("trl", bench_trl), ("memory", bench_memory)):
            if args.part in (part, "all"):
                sub = Path(d) / part
                sub.mkdir()
                fn(args, sub)


if __name__ == "__main__":
    main()
