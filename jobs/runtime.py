"""What a worker decides once: device, dtypes, autocast, rank and world, lockstep.

Made at the top of each worker (nanochat's `compute_init`); every component takes the Runtime
instead of loose `device, autocast, lockstep` arguments. Evaluation outside Ray (tune/evaluate.py)
makes a plain one: `Runtime(torch.device("cpu"))`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from jobs.config import JobConfig
from jobs.distributed import all_reduce_sum, rank_and_world

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


def collective_forward(cfg: JobConfig) -> bool:
    """Whether every forward pass is collective (parameters sharded: FSDP, ZeRO-3), so that ranks
    must run the same number of passes, in evaluation and generation too."""
    strategy = cfg.train.strategy
    return strategy == "fsdp" or (strategy == "deepspeed" and cfg.train.deepspeed.stage == 3)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    precision: str = "fp32"  # autocast: fp32 (none), bf16 or fp16
    collective_forward: bool = False  # see collective_forward(); with world > 1 it is lockstep

    @classmethod
    def for_job(cls, cfg: JobConfig, device: torch.device) -> Runtime:
        rank, world = rank_and_world()
        precision = resolve_precision(cfg.train.precision, device)
        return cls(device, rank, world, precision, collective_forward(cfg))

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
