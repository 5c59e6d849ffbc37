"""tune.evaluate with `engine: vllm`: the same greedy replies, scores and samples as the
transformers path; `engine: vllm` without vllm, or engine_args without it, fail at load time."""

from __future__ import annotations

import os

import pytest

from core.config import ConfigError, validate
from jobs.config import load_config
from serve.testing import make_random_adapter
from tests.helpers import REPO
from tune import evaluate as evaluate_module
from tune.evaluate import EvalSuiteConfig, evaluate

TASK = {"name": "sentiment", "metrics": ["exact_match", "contains"], "max_samples": 6}


def test_engine_defaults_to_transformers():
    assert validate(EvalSuiteConfig, {"tasks": [TASK]}).engine == "transformers"


def test_engine_vllm_without_vllm_is_a_config_error(monkeypatch):
    monkeypatch.setattr(evaluate_module, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"eval.yaml: engine: vllm is not importable here"):
        validate(EvalSuiteConfig, {"tasks": [TASK], "engine": "vllm"}, "eval.yaml")


def test_engine_args_need_engine_vllm():
    with pytest.raises(ConfigError, match="engine_args are vllm.LLM arguments"):
        validate(EvalSuiteConfig, {"tasks": [TASK], "engine_args": {"enforce_eager": True}})


@pytest.fixture(scope="module")
def vllm_ready():
    pytest.importorskip("vllm")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes too much here
        # unset, so that the test sees inference/vllm.py set it; restored for the later modules
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")
        env.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
        yield


@pytest.mark.integration
@pytest.mark.slow  # a vLLM engine start; the fast suite has the config checks
def test_vllm_and_transformers_give_the_same_replies(vllm_ready, tiny_model_dir, tmp_path):
    """Two tasks, so the base answers again after the adapter has taken its vLLM slot (passes
    with VLLM_PLUGINS= too: evaluate never batches base rows with adapter rows)."""
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    data = load_config(REPO / "configs/quickstart.yaml").data
    tasks = [
        {**TASK, "name": name, "data": data.model_dump(), "few_shot": 2, "max_new_tokens": 12}
        for name in ("first", "second")
    ]
    raw = {"tasks": tasks, "keep_samples": 6}
    by_hf = evaluate(validate(EvalSuiteConfig, raw), adapter, str(tiny_model_dir))
    vllm_raw = {
        **raw,
        "engine": "vllm",
        "engine_args": {"enforce_eager": True, "max_model_len": 512},
    }
    by_vllm = evaluate(validate(EvalSuiteConfig, vllm_raw), adapter, str(tiny_model_dir))

    replies = [s["reply"] for task in by_hf["samples"].values() for s in task]
    assert len(set(replies)) > 1, "all replies alike: the comparison would show nothing"
    assert by_vllm["samples"] == by_hf["samples"]
    assert by_vllm["tasks"] == by_hf["tasks"]
    # without CUDA the offline engine's core ran in this process (no engine-core process)
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
