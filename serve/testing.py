"""Random-weight LoRA adapters for tests and benchmarks: each seed gives a distinct adapter that
changes the base model's outputs (peft's default init would leave the outputs unchanged)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    r: int = 8,
    target_modules: tuple[str, ...] = TARGETS,
    created_at: str | None = None,
    base_model=None,
) -> Path:
    """Write a peft adapter for the model at base_dir; with created_at, a registry lineage.json."""
    model = base_model or AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(target_modules), init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    if base_model is not None:  # leave the caller's model as it was
        peft_model.unload()
    if created_at is not None:
        lineage = {"created_at": created_at, "seed": seed}
        (Path(out_dir) / "lineage.json").write_text(json.dumps(lineage))
    return Path(out_dir)
