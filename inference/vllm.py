"""vLLM, where it is installed: evaluation (`engine: vllm`) and the gateway (`engine: vllm`)
ask the same question."""

from __future__ import annotations

import importlib.util


def vllm_installed() -> bool:
    """Whether vllm can be imported here (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("vllm") is not None
