"""The base model's settings, shared by training, evaluation and serving."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import Section


class QuantizationConfig(Section):
    """QLoRA (bitsandbytes): the frozen base stored in 4-bit, LoRA trained on top in compute_dtype."""

    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ModelConfig(Section):
    name_or_path: str = Field(min_length=1)  # hub id, local directory or s3://bucket/prefix
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    cache_dir: str | None = None  # where s3:// models are downloaded; default ~/.cache/rayft/models
    trust_remote_code: bool = False
    quantization: QuantizationConfig | None = None  # QLoRA: the frozen base in 4-bit
    liger_kernel: bool = False  # Liger's fused kernels (GPU only, the `gpu` extra)
