"""What a training step costs: the device's peak memory, and the model FLOPs behind an MFU estimate.

    flops = ModelFlops.of(model)                      # once, from the model before it is wrapped
    flops.step(micro_batches, tokens)                 # the step's model FLOPs over every rank
    mfu(flops_per_s_per_device, device)               # a fraction of the device's bf16 peak, or None
    peak_memory_mb(device)                            # CUDA max allocated, or the process's peak RSS

The gradient norm comes from the strategy (`Parallel.last_grad_norm`, jobs/parallel.py).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s. Matched in
# order as substrings of torch.cuda.get_device_name(): the specific names come first ("A100"
# before "A10", "L40S" before "L4", the PCIe and NVL H100s before the SXM one).
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("B200", 2250.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),  # AWS's variant of the A10: no published tensor peak, so no MFU
    ("A10", 125.0),
    ("MI300X", 1307.4),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s; None on a CPU or a GPU the table does not name."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12 if tflops else None
    return None


def mfu(flops_per_s_per_device: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None: no peak known)."""
    peak = peak_flops(device)
    return flops_per_s_per_device / peak if peak else None


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far, MiB: CUDA's max allocated on a GPU, else the peak RSS
    (ru_maxrss: the whole process's, model, data and Python included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def memory_kind(device: torch.device) -> str:
    return "CUDA max allocated" if device.type == "cuda" else "RSS"


@dataclass
class ModelFlops:
    """Training FLOPs per token (PaLM's appendix B, as nanoGPT's `estimate_mfu`): 2 per weight in
    the forward, 2 in the backward to the activations, 2 more to the weight's own gradient where
    it trains (6N in full fine-tuning, ~4N under LoRA), plus 12 * layers * hidden * context for
    attention's two matmuls. Recomputation (gradient checkpointing) is not model FLOPs."""

    params: int  # weights that multiply: the input embedding (a lookup) left out unless tied
    trainable: int
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelFlops:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config

        def count(params) -> int:
            return sum(logical_numel(p) for p in params)

        params = list(model.parameters())
        embed = base.get_input_embeddings()
        tied = embed is not None and embed.weight is getattr(
            base.get_output_embeddings(), "weight", None
        )
        lookup = 0 if embed is None or tied else count(embed.parameters())
        return cls(
            params=count(params) - lookup,
            trainable=count(p for p in params if p.requires_grad),
            layers=getattr(config, "num_hidden_layers", 0),
            hidden=getattr(config, "hidden_size", 0),
        )

    def per_token(self, context: float) -> float:
        return 4 * self.params + 2 * self.trainable + 12 * self.layers * self.hidden * context

    def step(self, micro_batches: list[dict], tokens: int, default_context: int) -> float:
        """The step's model FLOPs over every rank: `tokens` (every rank's) at this rank's
        token-weighted mean attended length (from the batches' attention masks; packed rows
        count as one sequence), or `default_context` where a batch has no mask (GRPO's prompts)."""
        return tokens * self.per_token(attended_context(micro_batches) or default_context)


def logical_numel(p: torch.Tensor) -> int:
    """The weight's element count as the model computes with it: a ZeRO-3 partitioned parameter
    keeps it in ds_numel, a 4-bit (QLoRA) one packs two per byte and keeps its shape apart."""
    if hasattr(p, "ds_numel"):
        return p.ds_numel
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()  # a DTensor (FSDP2) reports its whole shape


def attended_context(micro_batches: list[dict]) -> float | None:
    """The token-weighted mean sequence length of the batches: sum(len^2) / sum(len)."""
    lengths = [
        b["attention_mask"].sum(dim=-1).double()
        for b in micro_batches
        # GRPO's micro-batches are prompts (lists): their lengths are known after generation
        if isinstance(b, dict)
        and isinstance(b.get("attention_mask"), torch.Tensor)
        and b["attention_mask"].dim() == 2
    ]
    if not lengths:
        return None
    flat = torch.cat(lengths)
    return float((flat**2).sum() / flat.sum().clamp(min=1))
