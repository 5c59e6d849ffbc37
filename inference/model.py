"""Loading a base model and its tokenizer (hub id, local directory or s3://), for training, evaluation and serving."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import storage
from core.config import ConfigError
from inference.config import ModelConfig
from inference.runtime import resolve_dtype

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
