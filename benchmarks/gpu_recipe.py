"""The recipe on a GPU: this project's own training and serving code on one CUDA device, one table.

    python benchmarks/gpu_recipe.py                  # on the GPU machine, under 8 minutes
    python benchmarks/gpu_recipe.py --cpu-smoke      # the same code paths, tiny, on CPU
    python benchmarks/gpu_recipe.py --only sft,logits

benchmarks/gpu_check.py checks the libraries (torch, peft, flash-attn, DeepSpeed, Liger) and
imports nothing from here. This script runs what a Ray Train worker runs, without Ray: the base
loaded by `inference.model.load_base_model`, LoRA by `jobs.model.add_lora`, the strategy object
of `jobs.parallel` (world size 1), and the objectives' own steps (`jobs.objectives.sft/dpo/grpo`),
whose losses are computed chunk by chunk from the hidden states; then the serving engine
(`inference.engine.HFEngine`) on mixed adapters. Ray does not fit in what can be carried to a
lent machine (64 MiB of wheels), and the worker's step does not need it: `make gpu-wheels` puts
the few packages the repository needs beyond the GPU image's (pydantic, trl, ...) in .whl/.

Rows: tokens/s and peak memory of each step on a Llama-shaped model with random weights (~540M
parameters), and the SFT loss's forward+backward on a real 128,256-token vocabulary at 4 x 2048
tokens, chunked (the recipe's) against the whole [tokens x vocabulary] logits in fp32 (what a
`model(...).logits` loss holds). Exit code 1 when a row errors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # gpu_check.py beside this file; the repository uninstalled
from gpu_check import (  # noqa: E402
    Row,
    check_device,
    llama,
    need,
    need_cuda,
    print_table,
    reset_memory,
    run_row,
    sync,
)
from gpu_check import write_model as write_weights  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rows: int  # sequences a step
    seq: int  # tokens a sequence


@dataclass(frozen=True)
class Sizes:
    step: Shape  # the training steps' model
    logits: Shape  # the chunked vs whole logits rows: a real vocabulary
    steps: int  # timed steps after one warm-up
    requests: int  # serving: requests in the mixed-adapter batch
    new_tokens: int


GPU = Sizes(
    step=Shape(2048, 8, 16, 8, 5632, 32000, 8, 512),
    logits=Shape(2048, 2, 16, 8, 5632, 128256, 4, 2048),
    steps=5,
    requests=16,
    new_tokens=32,
)
SMOKE = Sizes(
    step=Shape(64, 2, 4, 2, 128, 1024, 2, 32),
    logits=Shape(64, 1, 4, 2, 128, 4096, 2, 64),
    steps=1,
    requests=4,
    new_tokens=4,
)


@dataclass
class Ctx:
    device: torch.device
    sizes: Sizes
    work: Path
    smoke: bool


# ---------------------------------------------------------------- the recipe's pieces


def write_model(shape: Shape, out: Path, device: torch.device) -> Path:
    """A random Llama saved like a hub checkpoint, with the tiny model's tokenizer (and its chat
    template), so that loading goes through the recipe's own loader."""
    from jobs.tiny_model import build_tokenizer

    write_weights(llama(shape), out, device, torch.bfloat16)
    build_tokenizer(min(shape.vocab, 1024)).save_pretrained(out)
    return out


def job_config(ctx: Ctx, model_dir: Path, *overrides: str):
    from jobs.config import load_config

    return load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"model.name_or_path={model_dir}",
            f"scaling.use_gpu={str(ctx.device.type == 'cuda').lower()}",
            "train.gradient_checkpointing=false",
            "lora.r=16",
            *overrides,
        ],
    )


def recipe_parallel(cfg, ctx: Ctx):
    """The worker's model and strategy object, as jobs.finetune.setup builds them (no Ray)."""
    from inference.model import load_base_model
    from jobs.model import add_lora, enable_gradient_checkpointing
    from jobs.parallel import job_runtime, make_parallel

    rt = job_runtime(cfg, ctx.device)
    model = add_lora(load_base_model(cfg.model, ctx.device), cfg.lora)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    par = make_parallel(cfg, rt)
    par.setup(
        model,
        lambda params: torch.optim.AdamW(params, lr=cfg.train.lr),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    )
    par.model.train()
    return par, rt


def random_rows(shape: Shape, seed: int) -> list[dict[str, list[int]]]:
    """SFT examples of shape.seq tokens: the first quarter is the prompt (masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, shape.vocab, (shape.rows, shape.seq), generator=g).tolist()
    prompt = shape.seq // 4
    return [{"input_ids": row, "labels": [-100] * prompt + row[prompt:]} for row in ids]


def timed_steps(ctx: Ctx, step: Callable[[int], int]) -> str:
    """One warm-up step, then ctx.sizes.steps timed: tokens/s and peak memory."""
    step(0)
    sync(ctx)
    reset_memory(ctx)
    start, tokens = time.perf_counter(), 0
    for i in range(1, ctx.sizes.steps + 1):
        tokens += step(i)
    sync(ctx)
    rate = tokens / (time.perf_counter() - start)
    return f"{rate:,.0f} tok/s, {peak(ctx)}"


def peak(ctx: Ctx) -> str:
    if ctx.device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    import resource

    return (
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process)"
    )


# ---------------------------------------------------------------- rows


def row_load(ctx: Ctx, model_dir: Path) -> tuple[str, str]:
    from inference.model import attn_implementation, load_base_model

    cfg = job_config(ctx, model_dir)
    reset_memory(ctx)
    start = time.perf_counter()
    model = load_base_model(cfg.model, ctx.device)
    sync(ctx)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters()) / 1e6
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    attn = attn_implementation(cfg.model, ctx.device)
    return "ok", f"{params:.1f}M params, {dtype}, {attn}, {seconds:.1f} s, {peak(ctx)}"


def sft_row(*overrides: str) -> Callable[[Ctx, Path], tuple[str, str]]:
    def row(ctx: Ctx, model_dir: Path) -> tuple[str, str]:
        from jobs.batching import collate
        from jobs.objectives.sft import train_step

        cfg = job_config(ctx, model_dir, *overrides)
        par, rt = recipe_parallel(cfg, ctx)
        shape = ctx.sizes.step
        pad = 0

        def step(i: int) -> int:
            _, tokens = train_step(par, [collate(random_rows(shape, i), pad)], rt, 1.0)
            return tokens

        return "ok", timed_steps(ctx, step)

    return row


def row_qlora(ctx: Ctx, model_dir: Path) -> tuple[str, str]:
    need_cuda(ctx)
    need("bitsandbytes")
    return sft_row("model.quantization.bits=4")(ctx, model_dir)


def row_dpo(ctx: Ctx, model_dir: Path) -> tuple[str, str]:
    need("trl")
    from jobs.batching import collate_pairs
    from jobs.objectives.dpo import dpo_train_step

    cfg = job_config(ctx, model_dir, "train.method=dpo")
    par, rt = recipe_parallel(cfg, ctx)
    shape = ctx.sizes.step

    def step(i: int) -> int:
        rows = random_rows(shape, i)
        half = shape.seq // 2
        pairs = [
            {"prompt_ids": a["input_ids"][:half], "chosen_ids": a["input_ids"][half:],
             "rejected_ids": b["input_ids"][half:]}
            for a, b in zip(rows, rows[1:] + rows[:1], strict=True)
        ]  # fmt: skip
        _, tokens = dpo_train_step(par, [collate_pairs(pairs, 0)], rt, 1.0, cfg.train.dpo)
        return tokens

    return "ok", timed_steps(ctx, step)


def row_grpo(ctx: Ctx, model_dir: Path) -> tuple[str, str]:
    """The GRPO loss step on given completions (generation is the serving row's)."""
    need("trl")
    from jobs.config import GrpoConfig
    from jobs.objectives.grpo import trl_grpo_loss
    from jobs.rollout import completion_logps, pad_rollouts

    cfg = job_config(ctx, model_dir)
    par, rt = recipe_parallel(cfg, ctx)
    grader = {"type": "string_check", "name": "x", "input": "{{ sample.output_text }}",
              "reference": "a", "operation": "eq"}  # fmt: skip
    grpo = GrpoConfig(grader=grader)
    shape = ctx.sizes.step

    def step(i: int) -> int:
        rows = [r["input_ids"] for r in random_rows(shape, i)]
        half = shape.seq // 2
        batch = rt.to_device(pad_rollouts([r[:half] for r in rows], [r[half:] for r in rows], 0))
        batch["advantages"] = torch.randn(len(rows), device=ctx.device)
        batch["num_items_in_batch"] = batch["completion_mask"].sum().float()
        with rt.autocast():
            logps, entropies = completion_logps(par.model, batch, grpo.temperature)
        loss, _ = trl_grpo_loss(logps, entropies, batch, grpo)
        par.backward(loss, last=True)
        par.step(1.0)
        return int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())

    return "ok", timed_steps(ctx, step)


def whole_logits_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SFT loss from the whole logits in fp32: the baseline the chunked loss replaces."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum"
    )


def logits_row(chunked: bool) -> Callable[[Ctx, Path], tuple[str, str]]:
    def row(ctx: Ctx, model_dir: Path) -> tuple[str, str]:
        from jobs.batching import collate
        from jobs.evaluation import token_loss_sum

        cfg = job_config(ctx, model_dir)
        par, rt = recipe_parallel(cfg, ctx)
        shape = ctx.sizes.logits
        losses = []

        def step(i: int) -> int:
            batch = rt.to_device(collate(random_rows(shape, 0), 0))
            with rt.autocast():
                loss = (
                    token_loss_sum(par.model, batch)[0]
                    if chunked
                    else whole_logits_loss(par.model, batch)
                )
            loss.backward()
            par.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            return shape.rows * shape.seq

        result = timed_steps(ctx, step)
        return "ok", f"vocab {shape.vocab:,}, {shape.rows} x {shape.seq} tokens, {result}"

    return row


def row_serve(ctx: Ctx, model_dir: Path) -> tuple[str, str]:
    """inference.engine.HFEngine: one batch of requests spread over 4 adapters and the base."""
    from peft import LoraConfig, get_peft_model

    from inference.engine import GenerationRequest, HFEngine, SamplingParams, read_adapter
    from inference.model import load_base_model, load_tokenizer

    cfg = job_config(ctx, model_dir)
    tokenizer = load_tokenizer(cfg.model)
    keys = [f"a{i}" for i in range(4)]
    for i, key in enumerate(keys):
        torch.manual_seed(i)
        lora = LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(load_base_model(cfg.model, ctx.device), lora).save_pretrained(ctx.work / key)
    engine = HFEngine(load_base_model(cfg.model, ctx.device), tokenizer, max_adapters=4)
    for key in keys:
        engine.load_adapter(key, read_adapter(ctx.work / key))
    prompt = engine.encode_chat([{"role": "user", "content": "Tell me about Ray."}])
    params = SamplingParams(max_tokens=ctx.sizes.new_tokens, temperature=0.0)
    adapters = [None, *keys]
    requests = [
        GenerationRequest(prompt, adapters[i % len(adapters)], params)
        for i in range(ctx.sizes.requests)
    ]
    engine.generate(requests[:2])  # warm-up
    reset_memory(ctx)
    start = time.perf_counter()
    results = engine.generate(requests)
    sync(ctx)
    tokens = sum(r.completion_tokens for r in results)
    rate = tokens / (time.perf_counter() - start)
    return "ok", f"{len(requests)} requests over 4 adapters + base, {rate:,.0f} tok/s, {peak(ctx)}"


# key (for --only), the row's name, the row, which model it runs on
ROWS: list[tuple[str, str, Callable[[Ctx, Path], tuple[str, str]], str]] = [
    ("load", "load: inference.model.load_base_model", row_load, "step"),
    ("sft", "SFT LoRA step (jobs.objectives.sft)", sft_row(), "step"),
    ("sft-gc", "SFT LoRA step, activation checkpointing", sft_row("train.gradient_checkpointing=true"), "step"),
    ("qlora", "SFT QLoRA step (NF4 base)", row_qlora, "step"),
    ("dpo", "DPO LoRA step (jobs.objectives.dpo)", row_dpo, "step"),
    ("grpo", "GRPO loss step (jobs.objectives.grpo)", row_grpo, "step"),
    ("logits", "SFT loss fwd+bwd, 128k vocab, chunked (recipe)", logits_row(chunked=True), "logits"),
    ("logits", "SFT loss fwd+bwd, 128k vocab, whole logits", logits_row(chunked=False), "logits"),
    ("serve", "serving: HFEngine, mixed adapters", row_serve, "serve"),
]  # fmt: skip


def run_rows(ctx: Ctx, wanted: set[str]) -> list[Row]:
    unknown = wanted - {key for key, *_ in ROWS}
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}")
    chosen = [(name, fn, m) for key, name, fn, m in ROWS if not wanted or key in wanted]
    shapes = {
        "step": ctx.sizes.step,
        "logits": ctx.sizes.logits,
        # the serving row decodes text: the tokenizer's vocabulary, the step model's layers
        "serve": Shape(**{**ctx.sizes.step.__dict__, "vocab": 1024}),
    }
    dirs = {m: write_model(shapes[m], ctx.work / m, ctx.device) for m in {m for *_, m in chosen}}
    return [run_row(name, lambda fn=fn, m=m: fn(ctx, dirs[m]), ctx) for name, fn, m in chosen]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU")
    ap.add_argument(
        "--only", default="", help="rows: " + ",".join(dict.fromkeys(k for k, *_ in ROWS))
    )
    args = ap.parse_args(argv)
    device = check_device(args.cpu_smoke)
    if device is None:
        return 2
    start = time.perf_counter()
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (--cpu-smoke)"
    print(f"device: {where} · torch {torch.__version__} · transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpu-recipe-") as tmp:
        ctx = Ctx(device, SMOKE if args.cpu_smoke else GPU, Path(tmp), args.cpu_smoke)
        rows = run_rows(ctx, {k for k in args.only.split(",") if k})
    print_table(rows)
    errors = [r for r in rows if r.status in ("fail", "error")]
    print(
        f"\n{len(rows) - len(errors)} of {len(rows)} rows ran · {time.perf_counter() - start:.0f} s"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
