"""DeepSpeed's in-memory gather of a ZeRO-3 model's weights.

Private API: `DeepSpeedEngine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters)`.
It gathers the partitioned parameters one layer at a time onto rank 0 and moves each to CPU, so
no GPU ever holds the whole model; it must be called on every rank.

Why: DeepSpeed's public ways out of ZeRO-3 all go through disk (`save_16bit_model`, a checkpoint
plus `zero_to_fp32`) or gather every parameter at once (`GatheredParameters` over the whole
model, a full copy on each GPU). The job wants the weights in memory on rank 0 (to save a
Hugging Face checkpoint or hand an adapter on) with one layer's worth of GPU memory.
Supported DeepSpeed versions: core.upstream.SUPPORTED["deepspeed"].
"""

from __future__ import annotations

from typing import Any


def zero3_state_dict(engine: Any, trainable_only: bool) -> dict[str, Any] | None:
    """The 16-bit state dict of a ZeRO-3 engine's model on CPU on rank 0 (None on other ranks);
    only the trainable parameters when trainable_only. Every rank must call it."""
    return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
