"""GPU paths of the job's components: bf16 autocast LoRA training, the saved adapter, generation.

Run on a CUDA machine with `pytest -m gpu`; skipped elsewhere. No Ray here: the components are
what Ray Train workers run.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from inference.model import attn_implementation, load_base_model, load_tokenizer
from jobs.batching import collate, epoch_permutation, step_micro_batches
from jobs.config import load_config
from jobs.data.prepare import prepare_data
from jobs.evaluation import eval_loss, exact_match
from jobs.finetune import plan_steps
from jobs.model import add_lora, trainable_parameters
from jobs.objectives.sft import train_step
from jobs.parallel import job_runtime, make_parallel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def constant_lr_parallel(cfg, model, rt):
    par = make_parallel(cfg, rt)
    par.setup(
        model,
        lambda params: torch.optim.AdamW(params, lr=cfg.train.lr),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    )
    return par


def test_bf16_lora_training_on_cuda(tiny_model_dir, tmp_path):
    cfg = load_config(
        "configs/quickstart.yaml",
        [f"model.name_or_path={tiny_model_dir}", "scaling.use_gpu=true", "train.max_steps=120"],
    )
    device = torch.device("cuda")
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.run.seed)
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model, device), cfg.lora)
    assert next(model.base_model.model.model.embed_tokens.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainable_parameters(model))  # adapters stay fp32
    assert attn_implementation(cfg.model, device) in {"sdpa", "flash_attention_2"}

    rt = job_runtime(cfg, device)
    pad = tokenizer.pad_token_id
    base_loss = eval_loss(model, data.eval, 32, pad, rt)
    plan = plan_steps(len(data.train), cfg)
    par = constant_lr_parallel(cfg, model, rt)
    model.train()
    for step in range(plan.total_steps):
        epoch, k = divmod(step, plan.steps_per_epoch)
        order = epoch_permutation(len(data.train), 0, epoch)
        batches = step_micro_batches(
            order, k, cfg.train.effective_batch_size, 0, 1, cfg.train.micro_batch_size
        )
        micro = [collate([data.train[j] for j in idx], pad) for idx in batches]
        train_step(par, micro, rt, 1.0)
    trained_loss = eval_loss(model, data.eval, 32, pad, rt)
    assert trained_loss < base_loss / 4, (base_loss, trained_loss)
    assert exact_match(model, tokenizer, data.eval_conversations[:32], 4, 32, rt) > 0.5

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, device), tmp_path / "adapter")
    assert eval_loss(reloaded, data.eval, 32, pad, rt) == pytest.approx(trained_loss, rel=1e-3)


def test_qlora_trains_a_4bit_base_on_cuda(tiny_model_dir):
    """QLoRA: the frozen base in NF4 (bitsandbytes), the adapter trained in bf16 compute."""
    pytest.importorskip("bitsandbytes")
    cfg = load_config(
        "configs/quickstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            "scaling.use_gpu=true",
            "train.max_steps=60",
            "model.quantization.bits=4",
        ],
    )
    device = torch.device("cuda")
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.run.seed)
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model, device), cfg.lora)
    import bitsandbytes as bnb

    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and quantized[0].weight.quant_type == "nf4"
    rt, pad = job_runtime(cfg, device), tokenizer.pad_token_id
    base_loss = eval_loss(model, data.eval, 32, pad, rt)
    par = constant_lr_parallel(cfg, model, rt)
    model.train()
    for step in range(60):
        order = epoch_permutation(len(data.train), 0, step // 4)
        idx = step_micro_batches(order, step % 4, 16, 0, 1, 16)
        train_step(par, [collate([data.train[j] for j in i], pad) for i in idx], rt, 1.0)
    assert eval_loss(model, data.eval, 32, pad, rt) < base_loss / 2
