"""vLLM, where it is installed: evaluation (`engine: vllm`) and the gateway (`engine: vllm`)
ask the same question."""

from __future__ import annotations

import importlib.util
import os


def vllm_installed() -> bool:
    """Whether vllm can be imported here (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def offline_llm(model: str, **kwargs):
    """vLLM's offline engine (`vllm.LLM`), as evaluation and the GRPO rollouts start it.

    Without CUDA its engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless
    set): on 2 CPUs a tiny model's engine started and answered in 8.6-8.9 s instead of 24-25 s,
    one process of ~1.8 GB fewer. With CUDA vLLM's default stays: a separate engine-core process
    that schedules while the GPU runs. In this process vLLM seeds the global RNGs with the
    engine's seed (its warning says so): harmless to a rollout actor or an evaluation, which
    draw nothing after it."""
    import torch
    from vllm import LLM

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return LLM(model, **kwargs)
