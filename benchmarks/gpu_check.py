"""The GPU check: one script for a machine with one CUDA GPU, under 8 minutes, printing one table.

    python benchmarks/gpu_check.py                  # on the GPU machine
    python benchmarks/gpu_check.py --cpu-smoke      # the same code paths, tiny, on CPU (seconds)
    python benchmarks/gpu_check.py --only lora,serve

Rows: the checks of tests/test_gpu.py re-done inline (a bf16 LoRA adapter learns a task, reloads
with plain peft to the same loss; QLoRA trains a 4-bit base), then tokens/s and peak memory of a
bf16 LoRA step on a Llama-shaped model with random weights (~540M parameters, built from a
LlamaConfig: nothing is downloaded) under SDPA, flash-attention 2, FSDP2 on one GPU (world size
1), DeepSpeed ZeRO-2, QLoRA and Liger kernels, and peft generation with mixed adapters in one
batch (`adapter_names`), the serving engine's path before its own LoRA kernels.

Needs only torch, transformers, peft and accelerate: flash_attn, liger_kernel, bitsandbytes and
deepspeed are used where installed, and each row that needs a missing one prints `skip` and why.
It imports nothing from this repository (the project's modules pull in pydantic and Ray, which a
lent GPU machine may not have). Exit code 1 when a check fails or a row errors.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


class Skip(Exception):
    """A row that cannot run here: the reason is printed in the table."""


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int  # tokens per row of a training batch
    batch: int  # rows per training step
    steps: int  # timed training steps (after `warmup` untimed ones)
    warmup: int
    prompt: int  # serving: prompt tokens
    new_tokens: int  # serving: generated tokens per request
    requests: int  # serving: requests in one batch
    adapters: int  # serving: distinct adapters in the mixed batch


# ~540M parameters: 8 Llama layers of hidden 2048 (GQA 16/8 heads) and a 32k vocabulary.
BENCH = Size(2048, 8, 16, 8, 5632, 32000, 512, 8, 10, 2, 64, 32, 16, 4)
SMOKE = Size(64, 2, 4, 2, 128, 512, 32, 2, 2, 1, 8, 4, 4, 2)


@dataclass
class Row:
    name: str
    status: str  # pass | fail | ok | skip | error
    result: str


Outcome = tuple[str, str]  # a row's status and result


@dataclass
class Ctx:
    device: torch.device
    size: Size
    work: Path
    smoke: bool
    dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def autocast(self):
        if self.device.type != "cuda":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)


# ---------------------------------------------------------------- environment


def need(module: str):
    """Import an optional package or skip the row, naming what is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{module} not importable ({e})") from None


def need_cuda(ctx: Ctx) -> None:
    if ctx.device.type != "cuda":
        raise Skip("needs CUDA")


def reset_memory(ctx: Ctx) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(ctx: Ctx) -> str:
    if ctx.device.type != "cuda":
        return "peak - (CPU)"
    return f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def sync(ctx: Ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- models and data


def llama(size: Size) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max(2048, size.seq),
        tie_word_embeddings=False,
    )


def write_model(config: LlamaConfig, out: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """A random model saved like a hub checkpoint, so every row loads it through from_pretrained."""
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    # A trained output layer spans a wide logit range; at the default init scale a frozen head is
    # too flat to ever predict a label confidently (as in jobs/tiny_model.py).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.to(dtype).save_pretrained(out)
    del model
    return out


def load(path: Path, ctx: Ctx, attn: str = "sdpa", **kw) -> LlamaForCausalLM:
    if "quantization_config" not in kw:
        kw["device_map"] = {"": ctx.device}
    return LlamaForCausalLM.from_pretrained(path, dtype=ctx.dtype, attn_implementation=attn, **kw)


def with_lora(model, r: int = 16, seed: int = 0, name: str = "default"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config, adapter_name=name)


# The learnable task of the checks: a "review" of 12 tokens from one of three disjoint ranges, a
# separator, then the answer: the range's label token and an end token. Only the answer is scored.
SEP, EOS, LABEL0, WORD0, WORDS_PER_CLASS, PROMPT_LEN = 3, 2, 4, 8, 64, 12


def task_batch(n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (n, 1), generator=g)
    words = (
        WORD0
        + label * WORDS_PER_CLASS
        + torch.randint(0, WORDS_PER_CLASS, (n, PROMPT_LEN), generator=g)
    )
    ids = torch.cat([words, torch.full((n, 1), SEP), LABEL0 + label, torch.full((n, 1), EOS)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return ids.to(device), labels.to(device)


@torch.no_grad()
def task_scores(model, ctx: Ctx, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Loss on the answer tokens and exact match of the label predicted after the separator."""
    model.eval()
    with ctx.autocast():
        out = model(input_ids=ids, labels=labels)
    predicted = out.logits[:, -3].argmax(-1)
    model.train()
    return out.loss.item(), (predicted == ids[:, -2]).float().mean().item()


def train_task(model, ctx: Ctx, steps: int, lr: float = 2e-3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        ids, labels = task_batch(16, 1000 + step, ctx.device)
        with ctx.autocast():
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- the checks of tests/test_gpu.py


def check_bf16_lora(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    """A LoRA adapter on a bf16 base (fp32 adapter weights, bf16 autocast) learns the task and
    reloads with plain peft to the same loss."""
    from peft import PeftModel

    model = with_lora(load(tiny, ctx))
    adapter_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    ids, labels = task_batch(64, 7, ctx.device)
    base_loss, _ = task_scores(model, ctx, ids, labels)
    train_task(model, ctx, steps=30 if ctx.smoke else 120)
    loss, match = task_scores(model, ctx, ids, labels)
    model.save_pretrained(ctx.work / "adapter")
    reloaded = PeftModel.from_pretrained(load(tiny, ctx), ctx.work / "adapter")
    reloaded_loss, _ = task_scores(reloaded, ctx, ids, labels)
    problems = []
    if adapter_dtypes != {torch.float32}:
        problems.append(f"adapter dtypes {adapter_dtypes}")
    if not loss < base_loss / 4:
        problems.append("loss fell less than 4x")
    if not match > 0.5:
        problems.append("exact match <= 50%")
    if abs(reloaded_loss - loss) > 1e-3 * max(loss, 1e-6) + 1e-6:
        problems.append(f"reloaded loss {reloaded_loss:.4g}")
    dtype = str(ctx.dtype).removeprefix("torch.")
    detail = (
        f"{dtype} base, loss {base_loss:.3f} -> {loss:.4f}, exact match {match:.0%}, "
        f"reloaded {reloaded_loss:.4f}"
    )
    return ("fail" if problems else "pass", "; ".join([detail, *problems]))


def quantized_config():
    need("bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def check_qlora(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    """QLoRA: the frozen base in NF4 (bitsandbytes), the adapter trained in bf16 compute."""
    need_cuda(ctx)
    quant = quantized_config()
    import bitsandbytes as bnb

    model = with_lora(load(tiny, ctx, quantization_config=quant, device_map={"": 0}))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    ids, labels = task_batch(64, 7, ctx.device)
    base_loss, _ = task_scores(model, ctx, ids, labels)
    train_task(model, ctx, steps=60)
    loss, match = task_scores(model, ctx, ids, labels)
    ok = bool(layers) and layers[0].weight.quant_type == "nf4" and loss < base_loss / 2
    detail = (
        f"{len(layers)} NF4 layers, loss {base_loss:.3f} -> {loss:.4f}, exact match {match:.0%}"
    )
    return "pass" if ok else "fail", detail


# ---------------------------------------------------------------- training step throughput


def lora_steps(
    model, ctx: Ctx, backward: Callable | None = None, step: Callable | None = None
) -> str:
    """Timed LoRA steps on random tokens; tokens/s after the warm-up steps, and peak memory."""
    size = ctx.size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if step is None else None
    backward = backward or (lambda loss: loss.backward())
    step = step or (lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    g = torch.Generator().manual_seed(0)
    model.train()
    elapsed, losses = 0.0, []
    for i in range(size.warmup + size.steps):
        ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g).to(ctx.device)
        sync(ctx)
        start = time.perf_counter()
        with ctx.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        backward(loss)
        step()
        sync(ctx)
        if i >= size.warmup:
            elapsed += time.perf_counter() - start
        losses.append(loss.item())
    if not all(map(torch.isfinite, torch.tensor(losses))):
        raise RuntimeError(f"non-finite loss: {losses}")
    tokens = size.steps * size.batch * size.seq
    speed = f"{tokens / elapsed:,.0f} tok/s"
    return f"{speed}, {peak_memory(ctx)}, loss {losses[0]:.2f} -> {losses[-1]:.2f}"


def bench_sdpa(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    return "ok", lora_steps(with_lora(load(big, ctx, "sdpa")), ctx)


def bench_flash(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    need_cuda(ctx)
    need("flash_attn")
    return "ok", lora_steps(with_lora(load(big, ctx, "flash_attention_2")), ctx)


def bench_qlora(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    need_cuda(ctx)
    model = with_lora(load(big, ctx, quantization_config=quantized_config(), device_map={"": 0}))
    return ("ok", lora_steps(model, ctx))


def bench_liger(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy). They patch
    transformers' Llama classes for the rest of the process, so this row runs last."""
    need_cuda(ctx)
    liger = need("liger_kernel.transformers")
    liger.apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
    )
    return ("ok", lora_steps(with_lora(load(big, ctx)), ctx))


class ProcessGroup:
    """torch.distributed with world size 1 on this machine, as one Ray Train worker would have."""

    def __init__(self, ctx: Ctx):
        self.backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        self.env = {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }

    def __enter__(self):
        import torch.distributed as dist

        os.environ.update(self.env)
        if self.backend == "nccl":
            torch.cuda.set_device(0)  # NCCL binds the process group to the current device
        dist.init_process_group(self.backend, rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def bench_fsdp2(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    """FSDP2 `fully_shard` on every decoder layer and the root, as jobs/parallel.py wraps it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with ProcessGroup(ctx):
        model = with_lora(load(big, ctx))
        mp = MixedPrecisionPolicy(param_dtype=ctx.dtype, reduce_dtype=torch.float32)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        result = lora_steps(model, ctx)
    return "ok", result


def bench_zero2(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    """DeepSpeed ZeRO-2 with torch's AdamW (no op to compile), as jobs/parallel.py configures it."""
    deepspeed = need("deepspeed")
    with ProcessGroup(ctx):
        model = with_lora(load(big, ctx))
        params = [p for p in model.parameters() if p.requires_grad]
        config = {
            "train_batch_size": ctx.size.batch,
            "train_micro_batch_size_per_gpu": ctx.size.batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2},
            "bf16": {"enabled": ctx.dtype == torch.bfloat16},
            "zero_force_ds_cpu_optimizer": False,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(params, lr=1e-4), config=config
        )
        result = lora_steps(engine, ctx, backward=engine.backward, step=engine.step)
    return "ok", result


# ---------------------------------------------------------------- serving


@torch.no_grad()
def generate_tokens_per_s(
    model, ctx: Ctx, prompts: torch.Tensor, adapter_names: list[str]
) -> float:
    new = ctx.size.new_tokens
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.generate(
        input_ids=prompts[:, :4],
        adapter_names=adapter_names,
        max_new_tokens=2,
        min_new_tokens=2,
        do_sample=False,
        pad_token_id=0,
    )
    sync(ctx)
    start = time.perf_counter()
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        adapter_names=adapter_names,
        **kw,
    )
    sync(ctx)
    generated = (out.shape[1] - prompts.shape[1]) * out.shape[0]
    return generated / (time.perf_counter() - start)


def bench_serving(ctx: Ctx, tiny: Path, big: Path) -> Outcome:
    """peft generation of one batch: every row on the base vs rows spread over N random adapters
    (`adapter_names`, peft's mixed-adapter batches)."""
    from peft import LoraConfig

    size = ctx.size
    model = with_lora(load(big, ctx), r=8, name="a0")
    for i in range(1, size.adapters):
        torch.manual_seed(i)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False
        )
        model.add_adapter(f"a{i}", config)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, size.vocab, (size.requests, size.prompt), generator=g).to(ctx.device)
    base = generate_tokens_per_s(model, ctx, prompts, ["__base__"] * size.requests)
    mixed_names = [f"a{i % size.adapters}" for i in range(size.requests)]
    mixed = generate_tokens_per_s(model, ctx, prompts, mixed_names)
    detail = (
        f"{size.requests} requests x {size.new_tokens} tokens: base {base:,.0f} tok/s, "
        f"{size.adapters} adapters mixed {mixed:,.0f} tok/s ({mixed / base:.2f}x), "
        f"{peak_memory(ctx)}"
    )
    return "ok", detail


# ---------------------------------------------------------------- the table


# The checks' model (as tests/test_gpu.py's tiny model): 2 layers of hidden 256, vocabulary 256.
TASK_MODEL = Size(256, 2, 4, 2, 512, 256, 16, 16, 0, 0, 0, 0, 0, 0)

# key (for --only), the row's name, the row; rows take (ctx, task model dir, step model dir)
ROWS: list[tuple[str, str, Callable[[Ctx, Path, Path], Outcome]]] = [
    ("lora", "LoRA on a bf16 base trains, reloads", check_bf16_lora),
    ("qlora", "QLoRA trains a 4-bit base", check_qlora),
    ("sdpa", "LoRA step, sdpa", bench_sdpa),
    ("flash", "LoRA step, flash_attention_2", bench_flash),
    ("fsdp2", "LoRA step, FSDP2 (world size 1)", bench_fsdp2),
    ("deepspeed", "LoRA step, DeepSpeed ZeRO-2 (world size 1)", bench_zero2),
    ("qlora-step", "LoRA step, QLoRA (NF4 base)", bench_qlora),
    ("serve", "serving: peft generate, mixed adapters", bench_serving),
    # last: Liger patches transformers' Llama classes for the rest of the process
    ("liger", "LoRA step, sdpa + Liger kernels", bench_liger),
]


def run_row(name: str, fn: Callable[[], Outcome], ctx: Ctx) -> Row:
    reset_memory(ctx)
    start = time.perf_counter()
    try:
        status, result = fn()
    except Skip as e:
        return Row(name, "skip", str(e))
    except Exception as e:  # a row that breaks is reported, the others still run
        traceback.print_exc()
        first_line = str(e).splitlines()[0] if str(e) else ""
        return Row(name, "error", f"{type(e).__name__}: {first_line}")
    return Row(name, status, f"{result} ({time.perf_counter() - start:.1f} s)")


def run_rows(ctx: Ctx, wanted: set[str]) -> list[Row]:
    unknown = wanted - {key for key, _, _ in ROWS}
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}")
    tiny = write_model(llama(TASK_MODEL), ctx.work / "tiny", ctx.device, ctx.dtype)
    big = write_model(llama(ctx.size), ctx.work / "big", ctx.device, ctx.dtype)
    chosen = [(name, fn) for key, name, fn in ROWS if not wanted or key in wanted]
    return [run_row(name, lambda fn=fn: fn(ctx, tiny, big), ctx) for name, fn in chosen]


def header(ctx: Ctx) -> str:
    import peft

    where = torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "CPU (--cpu-smoke)"
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(llama(ctx.size)).parameters())
    size = f"{params / 1e6:.1f}M"
    return (
        f"device: {where} · torch {torch.__version__} (CUDA {torch.version.cuda}) · transformers "
        f"{transformers.__version__} · peft {peft.__version__}\n"
        f"step model: Llama-shaped, random, {size} params, hidden {ctx.size.hidden} x "
        f"{ctx.size.layers} layers; {ctx.size.batch} x {ctx.size.seq} tokens a step, "
        "LoRA r=16 all-linear"
    )


def print_table(rows: list[Row]) -> None:
    width = max(len(r.name) for r in rows)
    print(f"\n| {'check':<{width}} | status | result |")
    print(f"|{'-' * (width + 2)}|--------|--------|")
    for r in rows:
        print(f"| {r.name:<{width}} | {r.status:<6} | {r.result} |")


def check_device(cpu_smoke: bool) -> torch.device | None:
    """The device the rows run on, transformers' logging quieted; None (said why) where there is
    no CUDA and no --cpu-smoke."""
    if not cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if cpu_smoke:  # threads on a small shared machine spin against each other
        torch.set_num_threads(1)
    return torch.device("cpu" if cpu_smoke else "cuda")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on CPU, GPU-only rows skipped"
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated rows: lora,qlora,sdpa,flash,fsdp2,deepspeed,qlora-step,serve,liger",
    )
    args = ap.parse_args(argv)
    device = check_device(args.cpu_smoke)
    if device is None:
        return 2
    wanted = {k for k in args.only.split(",") if k}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Ctx(device, SMOKE if args.cpu_smoke else BENCH, Path(tmp), args.cpu_smoke)
        print(header(ctx))
        rows = run_rows(ctx, wanted)
    print_table(rows)
    bad = [r for r in rows if r.status in ("fail", "error")]
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "ok", "skip", "fail", "error")}
    print(
        "\n"
        + " · ".join(f"{n} {s}" for s, n in counts.items() if n)
        + f" · {time.perf_counter() - start:.0f} s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
