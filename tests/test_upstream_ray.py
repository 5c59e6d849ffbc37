"""Ray's private names behind core/upstream/ray.py: a config that reaches them refuses a Ray
outside the supported range when it loads, and each name still exists in the installed Ray."""

from __future__ import annotations

import asyncio
import importlib.util
import re

import pytest
from pydantic import ValidationError

from core import upstream
from core.config import ConfigError
from core.upstream import ray as upstream_ray
from tests.helpers import REPO

OLD_RAY = "2.59.1"
# Ray Serve LLM's names need vLLM, whose import starts a process: those tests are integration.
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="no vLLM")


@pytest.fixture
def old_ray(monkeypatch):
    """`core.upstream.installed` answers an unsupported Ray; every other version as installed."""
    real = upstream.installed
    monkeypatch.setattr(upstream, "installed", lambda d: OLD_RAY if d == "ray" else real(d))


def assert_names_ray(message: str) -> None:
    assert f"ray {OLD_RAY} is installed" in message, message
    assert f"ray{upstream.SUPPORTED['ray']}" in message, message


def test_a_sweep_config_refuses_an_unsupported_ray(old_ray):
    from tune.sweep import load_sweep_config

    with pytest.raises(ConfigError) as e:
        load_sweep_config(REPO / "configs/sweep_reviews.yaml")
    assert_names_ray(str(e.value))
    assert "sweep_reviews.yaml" in str(e.value)  # which config needed it


def test_a_pipeline_config_refuses_an_unsupported_ray(old_ray):
    from tune.pipeline import load_pipeline_config

    with pytest.raises(ConfigError) as e:
        load_pipeline_config(REPO / "configs/pipeline.yaml")
    assert_names_ray(str(e.value))


def test_a_missing_ray_is_named(monkeypatch):
    from tune.sweep import load_sweep_config

    monkeypatch.setattr(upstream, "installed", lambda d: None)
    supported = re.escape(f"ray is not installed; supported: ray{upstream.SUPPORTED['ray']}")
    with pytest.raises(ConfigError, match=supported):
        load_sweep_config(REPO / "configs/sweep_reviews.yaml")


@needs_vllm
def test_serve_settings_check_ray_only_for_the_vllm_engine(old_ray):
    from serve.config import ServeSettings

    settings = {"base_model": "m", "allow_unauthenticated": True}
    with pytest.raises(ValidationError) as e:
        ServeSettings.model_validate({**settings, "engine": "vllm"})
    assert_names_ray(str(e.value))
    assert ServeSettings.model_validate({**settings, "engine": "hf"}).resolved_engine == "hf"


def test_the_asha_bracket_stops_a_trial_below_its_rung():
    from ray.tune.schedulers import TrialScheduler

    bracket = upstream_ray.asha_bracket(10, 41, 2)
    trial = type("T", (), {"trial_id": "0"})
    other = type("T", (), {"trial_id": "1"})
    assert bracket.on_result(trial, 10, -1.0) == TrialScheduler.CONTINUE
    assert bracket.on_result(other, 10, -5.0) == TrialScheduler.STOP  # worse at the same rung


def test_around_adapter_resolution_wraps_the_step():
    calls = []

    class Base:
        async def _maybe_resolve_lora_from_multiplex(self):
            calls.append("ray's step")

    async def around(server, resolve):
        calls.append("before")
        await resolve()
        calls.append("after")

    server_cls = upstream_ray.around_adapter_resolution(around)(type("S", (Base,), {}))
    asyncio.run(server_cls()._maybe_resolve_lora_from_multiplex())
    assert calls == ["before", "ray's step", "after"]
    with pytest.raises(TypeError, match="no _maybe_resolve_lora_from_multiplex"):
        upstream_ray.around_adapter_resolution(around)(type("Bare", (), {}))


def test_serve_start_exists():
    from ray.serve._private.api import serve_start  # what deploy_serve_config calls

    assert callable(serve_start)


@pytest.mark.integration
@needs_vllm
def test_the_chat_request_sanitizer_exists():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert upstream_ray.picklable_chat_request(request).messages[0]["content"] == "hi"


@pytest.mark.integration
@needs_vllm
def test_the_adapter_loader_gives_each_adapter_its_directory_and_a_new_id(tmp_path):
    seen = []

    def local_path(model_id: str) -> str:
        seen.append(model_id)
        return str(tmp_path / model_id)

    loader = upstream_ray.adapter_loader(local_path)(download_timeout_s=None, max_tries=1)
    first = asyncio.run(loader.load_model_from_config("a@1", llm_config=None))
    second = asyncio.run(loader.load_model_from_config("b@2", llm_config=None))
    assert (first.model_id, first.local_path) == ("a@1", str(tmp_path / "a@1"))
    assert second.local_path == str(tmp_path / "b@2")
    assert first.lora_assigned_int_id != second.lora_assigned_int_id
    assert seen == ["a@1", "b@2"]


@pytest.mark.integration
@needs_vllm
def test_llm_server_has_the_step_around_adapter_resolution_wraps():
    from ray.serve.llm import LLMServer

    assert callable(LLMServer._maybe_resolve_lora_from_multiplex)
