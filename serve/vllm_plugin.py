"""vLLM general plugin: base rows in a mixed LoRA batch get no adapter on the CPU LoRA ops.

Loaded by vLLM in every process it starts (front end, engine core, workers, also under Ray)
through the `vllm.general_plugins` entry point `rayft_lora_fix` in pyproject.toml.
"""

from __future__ import annotations

import logging
import os

# Under vLLM's logger, so the line shows with its handler and level in every vLLM process.
logger = logging.getLogger("vllm.rayft_lora_fix")

# Marks our wrapper, so that a second register() in the same process does nothing.
_MARK = "_rayft_base_rows_zeroed"


def register() -> None:
    """Wrap vLLM's torch `bgmv_shrink` so rows with LoRA index -1 get a zero shrink output.

    Why: `vllm.lora.ops.torch_ops.lora_ops.bgmv_shrink` (used by `PunicaWrapperCPU` for
    prefill through `sgmv_shrink` and for decode and logits directly) gathers
    `lora_weights[lora_indices]`, and -1 ("no LoRA") picks the last adapter slot, so a base
    request batched with LoRA requests gets that adapter's output (vllm-project/vllm#48421,
    open). A zero shrink output makes the following expand add nothing to those rows.
    Idempotent; a no-op with a log line where the function is missing or already correct.
    """
    if (
        os.environ.get("RAYFT_VLLM_LORA_FIX", "1") == "0"
    ):  # serve setting vllm.fix_cpu_lora_base_rows
        logger.info("rayft_lora_fix: off (RAYFT_VLLM_LORA_FIX=0); nothing patched")
        return
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as err:
        logger.info("rayft_lora_fix: vLLM's torch LoRA ops not found (%s); nothing patched", err)
        return

    original = getattr(lora_ops, "bgmv_shrink", None)
    if original is None:
        logger.info("rayft_lora_fix: lora_ops.bgmv_shrink not found; nothing patched")
        return
    if getattr(original, _MARK, False):
        return
    if not _picks_last_slot_for_base_rows(original):
        logger.info("rayft_lora_fix: bgmv_shrink already leaves base rows at zero; nothing patched")
        return

    def bgmv_shrink(inputs, lora_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        original(inputs, lora_weights, output_tensor, lora_indices_tensor, scaling)
        # masked_fill_ keeps shapes static (no data-dependent branch) for torch.compile.
        base_rows = lora_indices_tensor.eq(-1).unsqueeze(-1)
        output_tensor[: base_rows.shape[0]].masked_fill_(base_rows, 0)

    setattr(bgmv_shrink, _MARK, True)
    bgmv_shrink.__wrapped__ = original
    # sgmv_shrink looks bgmv_shrink up in lora_ops; punica_cpu and the package imported it
    # by name, so each binding is replaced.
    for module in (lora_ops, torch_ops, punica_cpu):
        module.bgmv_shrink = bgmv_shrink
    logger.info("rayft_lora_fix: wrapped vLLM torch bgmv_shrink (base rows get no LoRA)")


def _picks_last_slot_for_base_rows(bgmv_shrink) -> bool:
    """True where `bgmv_shrink` gives a row with index -1 the last slot's output (the bug)."""
    import torch

    weights = torch.zeros(2, 1, 1, 2)  # (slots, 1, rank, hidden): slot 0 zero, slot 1 not
    weights[1] = 1.0
    out = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 2), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)
