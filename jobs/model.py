"""Loading the base model and tokenizer (hub id, local directory or s3://) and adding LoRA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import storage
from jobs.config import ConfigError, LoraConfig, ModelConfig
from jobs.runtime import resolve_dtype

DEFAULT_CACHE = Path.home() / ".cache" / "rayft" / "models"


def download_s3_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local copy of s3://bucket/prefix in the model cache, downloaded once."""
    try:
        return storage.cached_copy(uri, cache_dir or DEFAULT_CACHE)
    except storage.EmptyLocation:
        raise ConfigError(f"model.name_or_path: no files under {uri}") from None
    except (OSError, PermissionError) as e:  # s3fs maps auth and network errors to OSError
        raise ConfigError(
            f"model.name_or_path: cannot list {uri}: {type(e).__name__}: {e}"
        ) from None


def resolve_model_path(cfg: ModelConfig) -> str:
    """A path or hub id that from_pretrained can read; s3:// is downloaded to the local cache."""
    if storage.is_remote(cfg.name_or_path):
        return str(download_s3_dir(cfg.name_or_path, cfg.cache_dir))
    looks_local = cfg.name_or_path.startswith(("/", ".", "~")) or cfg.name_or_path.count("/") > 1
    if looks_local and not Path(cfg.name_or_path).expanduser().is_dir():
        raise ConfigError(
            f"model.name_or_path: no such directory: {cfg.name_or_path} "
            "(a hub id looks like org/name; for the quickstart model run: python -m jobs.tiny_model DIR)"
        )
    return cfg.name_or_path


def load_tokenizer(cfg: ModelConfig):
    path = resolve_model_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        raise ConfigError(
            f"model.name_or_path: cannot load a tokenizer from {path!r}: {e}"
        ) from None
    if tokenizer.chat_template is None:
        raise ConfigError(f"model.name_or_path: the tokenizer at {path!r} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attn_implementation(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_base_model(cfg: ModelConfig, device: torch.device):
    path = resolve_model_path(cfg)
    kwargs = {}
    if cfg.quantization:  # QLoRA: weights quantized while loading, placed on the device then
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        q = cfg.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
        kwargs["device_map"] = {"": device}
    if cfg.liger_kernel:
        from liger_kernel.transformers import AutoLigerKernelForCausalLM as auto_class
    else:
        auto_class = AutoModelForCausalLM
    model = auto_class.from_pretrained(
        path,
        revision=cfg.revision,
        dtype=resolve_dtype(cfg.dtype, device),
        attn_implementation=attn_implementation(cfg, device),
        trust_remote_code=cfg.trust_remote_code,
        **kwargs,
    )
    if cfg.quantization:
        # norms in fp32, the 4-bit weights frozen; checkpointing is the job's own setting
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model.to(device)


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


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
