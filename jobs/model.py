"""LoRA on a loaded base model (inference/model.py loads it): the adapter, its initial weights,
and the memory options: gradient checkpointing, activation offloading."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from core.config import ConfigError
from jobs.config import LoraConfig


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
    )


def add_lora(model, cfg: LoraConfig):
    model = get_peft_model(model, peft_lora_config(cfg))
    if cfg.init_from:
        load_adapter_weights(model, cfg.init_from)
    return model


def load_adapter_weights(model, adapter_dir: str) -> None:
    """Start from a trained adapter's weights (lora.init_from): every LoRA tensor of the new
    adapter must come from it, with the same shapes (the same r and target modules)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights_file = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ConfigError(f"lora.init_from: {weights_file} not found (a peft adapter directory?)")
    try:
        result = set_peft_model_state_dict(model, load_file(str(weights_file)))
    except RuntimeError as e:  # a shape mismatch: another rank or base
        raise ConfigError(f"lora.init_from: {adapter_dir} does not fit lora: {e}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"lora.init_from: {adapter_dir} does not match the lora section (missing "
            f"{missing[:2]}, unexpected {list(result.unexpected_keys)[:2]}): give the same "
            "r and target_modules as the adapter was trained with"
        )


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations.

    Non-reentrant checkpointing: it needs no `enable_input_require_grads` for LoRA's frozen
    embeddings, works under FSDP2 and DeepSpeed, and replays the RNG so dropout (and so the
    losses) are the same as without it.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers 5.x's name; the old warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False  # a cache is of no use in training and clashes with recompute


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """What the backward pass needs from the forward, kept in CPU memory (pinned on CUDA) and
    brought back when the backward reaches it. torch's `save_on_cpu` with one change (as
    torchtune's OffloadActivations does): weights, and views of them (`weight.t()` saved by a
    linear layer), stay where they are; save_on_cpu would copy every frozen base weight to the
    CPU and back on each forward of a LoRA step. On a CPU device nothing moves: a no-op."""

    def __init__(self, pin_memory: bool):
        def pack(t: torch.Tensor):
            weight = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
            if weight or t.device.type == "cpu":
                return t
            packed = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin_memory)
            packed.copy_(t, non_blocking=pin_memory)
            return (t.device, packed)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, t = packed
            return t.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)


def enable_activation_offloading(model, device: torch.device) -> None:
    """Offload the saved activations of every training forward of the transformers model to CPU
    memory (`OffloadActivations`). With gradient checkpointing on, the checkpointed layers keep
    only their inputs and recompute the rest: what is offloaded is what checkpointing keeps."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    entered: list[OffloadActivations | None] = []

    def enter(module, args):
        hooks = OffloadActivations(pin_memory=device.type == "cuda")
        entered.append(hooks if torch.is_grad_enabled() else None)
        if entered[-1] is not None:
            hooks.__enter__()

    def leave(module, args, output):
        hooks = entered.pop()
        if hooks is not None:
            hooks.__exit__(None, None, None)

    base.register_forward_pre_hook(enter)
    base.register_forward_hook(leave, always_call=True)  # on an exception too


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
