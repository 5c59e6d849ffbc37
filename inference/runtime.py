"""What a worker decides once: device, dtypes, autocast, rank and world, lockstep.

Made at the top of each worker (nanochat's `compute_init`); every component takes the Runtime
instead of loose `device, autocast, lockstep` arguments. Evaluation outside Ray (tune/evaluate.py)
makes a plain one: `Runtime(torch.device("cpu"))`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype setting ("auto", "bfloat16", ...) on this device: auto is bf16 where the device
    has bf16 arithmetic (this CPU emulates it, far slower), fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    return getattr(torch, name)


def resolve_precision(name: str, device: torch.device) -> str:
    """train.precision on this device: auto is bf16 autocast where supported, else fp32."""
    if name == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return name


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    precision: str = "fp32"  # autocast: fp32 (none), bf16 or fp16
    collective_forward: bool = False  # sharded weights (jobs/parallel.py); with world > 1: lockstep

    @property
    def lockstep(self) -> bool:
        """Ranks must make the same number of forward passes (sharded weights, several ranks)."""
        return self.collective_forward and self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.device)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
