"""Distributed plumbing, kept apart from model and data code: ranks, seeds, reductions.

How the model is wrapped and sharded (DDP, FSDP, DeepSpeed) is jobs/parallel.py.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torch.distributed as dist

from inference.runtime import rank_and_world

logger = logging.getLogger("jobs")


def print0(message: str) -> None:
    """Progress lines from rank 0. Through logging: Ray Train routes it to the driver once, while
    its patched print() echoes twice when a library has wrapped sys.stdout."""
    if rank_and_world()[0] == 0:
        logger.info(message)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_gather_objects(value) -> list:
    """Every rank's `value`, in rank order (a one-item list outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
