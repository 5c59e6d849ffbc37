"""jobs.merge: a merged model reproduces base + adapter, standalone, in float32 and bfloat16."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.config import ConfigError
from jobs.merge import merge_adapter
from tests.helpers import REPO
from tests.test_registry import make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory, tokenizer):
    out = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed=5, r=8)
    tokenizer.save_pretrained(out)
    return out


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("the lid is sturdy and the strap is poor", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_model_equals_base_plus_adapter(adapter, tiny_model_dir, tmp_path, tokenizer):
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)
    )
    base_only = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    expected = logits(reference, tokenizer)
    assert not torch.allclose(expected, base_only, atol=1e-3)  # the adapter changes the output

    out = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, tokenizer), expected, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template

    bf16 = merge_adapter(adapter, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (logits(model, tokenizer) - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_and_errors(adapter, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.merge", str(adapter), "--out", str(tmp_path / "m")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="not a peft adapter"):
        merge_adapter(tmp_path, tmp_path / "x")
