"""Chunked logits vs whole logits: peak memory and tokens/s of one LoRA training step on CPU.

    python benchmarks/logits_bench.py     # ~6 minutes on 2 CPUs; the whole-logit runs peak at ~13 GB

A 2-layer, hidden-256 Llama with Llama 3's 128,256-token vocabulary (random weights, nothing
downloaded), LoRA on every linear layer, one forward + backward of the SFT loss over 4 rows of
2048 tokens, every position a label (the worst case for chunking: nothing to skip):

whole    the loss as it was computed before jobs/logits.py: the model's whole [tokens x vocab]
         logits, upcast to fp32, one cross-entropy (kept here as the baseline)
chunked  jobs.evaluation.token_loss_sum: the logits 1024 positions at a time, each chunk
         recomputed in backward (jobs/logits.py)
trl      TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, `fused_lm_head=True`): its
         chunked log-prob kernel, in torch ops off GPU (--modes to include it)

Each run is a fresh process (the kernel's peak-RSS mark, VmHWM, reset just before the step:
/proc/self/clear_refs), modes interleaved round by round; the median of --rounds is reported,
with the ratios to `whole`. Liger's fused linear cross-entropy is a Triton kernel: GPU only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def whole_logits_loss(model, batch):
    """The SFT loss as jobs/evaluation.py computed it before chunking (the baseline)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
    )


def trl_fused_loss(model, batch):
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        fused_lm_head=True,
    )
    return -out.log_probs.sum()


def build(args, mode: str):
    from jobs.config import LoraConfig
    from jobs.model import add_lora
    from jobs.tiny_model import build_model

    model = build_model(args.vocab, hidden=args.hidden, layers=args.layers)
    model.config.max_position_embeddings = max(2048, args.seq_len)
    if mode == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)  # before peft, as TRL's trainers do
    model = add_lora(model, LoraConfig())
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.rows, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, batch


def child(args) -> None:
    """One mode, one step, in this fresh process: prints its loss, seconds and peak RSS."""
    from jobs.evaluation import token_loss_sum

    ctypes.CDLL(None).mallopt(-3, 65536)  # M_MMAP_THRESHOLD: freed tensors leave RSS
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, batch = build(args, args.child)
    loss_fn = {
        "whole": whole_logits_loss,
        "chunked": lambda m, b: token_loss_sum(m, b)[0],
        "trl": trl_fused_loss,
    }[args.child]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    loss = loss_fn(model, batch)
    loss.backward()
    seconds = time.perf_counter() - t0
    result = {"loss": loss.item(), "seconds": seconds, "peak": _status("VmHWM"), "base": before}
    print(json.dumps(result))


def run_child(args, mode: str) -> dict:
    argv = [sys.executable, __file__, "--child", mode]
    for name in ("vocab", "hidden", "layers", "rows", "seq_len", "threads"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="whole,chunked", help="of whole,chunked,trl")
    parser.add_argument("--child", choices=["whole", "chunked", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    modes = args.modes.split(",")
    tokens = args.rows * args.seq_len
    print(
        f"LoRA step, {args.layers}-layer hidden-{args.hidden} Llama, vocab {args.vocab:,}, "
        f"{args.rows} x {args.seq_len} tokens, {args.threads} threads, {args.rounds} rounds"
    )
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            res = run_child(args, mode)
            runs[mode].append(res)
            print(
                f"  round {r + 1} {mode:8s} loss {res['loss']:.4f}  {res['seconds']:6.1f} s  "
                f"peak RSS {res['peak'] / 2**30:6.2f} GiB"
            )
    report(runs, tokens)


def report(runs: dict[str, list[dict]], tokens: int) -> None:
    med = {
        m: {
            "peak": statistics.median(r["peak"] for r in rs),
            "tps": statistics.median(tokens / r["seconds"] for r in rs),
            "best_tps": max(tokens / r["seconds"] for r in rs),
        }
        for m, rs in runs.items()
    }
    print(
        "| mode | peak RSS (GiB, median) | tokens/s (median) | tokens/s (best) | memory / whole | speed / whole |"
    )
    print("|---|---|---|---|---|---|")
    base = med.get("whole")
    for m, v in med.items():
        mem = f"{v['peak'] / base['peak']:.2f}x" if base else "-"
        speed = f"{v['tps'] / base['tps']:.2f}x" if base else "-"
        print(
            f"| {m} | {v['peak'] / 2**30:.2f} | {v['tps']:,.0f} | {v['best_tps']:,.0f} | "
            f"{mem} | {speed} |"
        )
    if base and "chunked" in med:
        c = med["chunked"]
        print(
            f"chunked / whole: peak memory {c['peak'] / base['peak']:.2f}x (target <= 0.35x), "
            f"tokens/s {c['tps'] / base['tps']:.2f}x (target >= 0.95x)"
        )


if __name__ == "__main__":
    main()
