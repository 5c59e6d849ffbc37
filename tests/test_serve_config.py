"""configs/serve.yaml is a valid Serve config whose args build the app; settings fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from inference.engine import GenerationRequest
from serve.app import MultiAdapterServer
from serve.config import ServeSettings
from serve.model import ModelServer
from serve.scheduler import group_by_adapter_limit
from serve.vllm_server import DEPLOYMENT

CONFIG = Path("configs/serve.yaml")


@pytest.mark.parametrize("config", [CONFIG, Path("configs/serve-routed.yaml")])
# Building the vllm app reads Ray's runtime context (LLMServer.get_deployment_options): the
# session's Ray, else it would start one of its own.
@pytest.mark.usefixtures("ray_local")
def test_serve_yaml_is_a_valid_serve_config_that_builds_the_app(config, tiny_model_dir):
    raw = yaml.safe_load(config.read_text())
    raw["applications"][0]["args"]["base_model"] = str(tiny_model_dir)  # a fresh clone has none
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app"
    settings = ServeSettings.model_validate(app.args)
    deployment = app.deployments[0]
    if settings.resolved_engine == "vllm":
        assert deployment.name == DEPLOYMENT
    else:
        holder = MultiAdapterServer if settings.resolved_layout == "single" else ModelServer
        assert deployment.name == holder.name
    autoscaling = deployment.autoscaling_config
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    # Serve's own queue limits in `deployments:` would override the app's and answer overload
    # in plain text instead of the OpenAI error shape.
    fields = deployment.model_dump(exclude_unset=True)
    assert "max_ongoing_requests" not in fields and "max_queued_requests" not in fields
    assert Path(settings.tenants).is_file()
    # The way `serve run` calls the builder: args are validated against its annotation.
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert type(built).__name__ == "Application"
    with pytest.raises(ValidationError, match="max_loaded_adapters"):
        call_user_app_builder_with_args_if_necessary(
            import_attr(app.import_path), {**app.args, "max_loaded_adapters": 0}
        )


@pytest.mark.parametrize(
    "args, message",
    [
        ({"base_model": "m"}, "give a tenants file"),
        ({"base_model": "m", "tenants": "t", "max_batch_size": 100}, "max_ongoing_requests"),
        ({"base_model": "m", "tenants": "t", "adapters": {"Bad/Name": "x"}}, "invalid model names"),
        ({"base_model": "m", "tenants": "t", "max_tokens": 5}, "max_tokens"),
        ({"base_model": "m", "tenants": "t", "alias_ttl_s": -1}, "alias_ttl_s"),
    ],
)
def test_bad_settings_name_the_field(args, message):
    with pytest.raises(ValidationError, match=message):
        ServeSettings.model_validate(args)


def job(adapter):
    return GenerationRequest([1], adapter)


def test_batches_split_into_groups_the_cache_can_hold():
    jobs = [job(a) for a in ["a", "b", None, "c", "a", "d", None, "c", "e"]]
    groups = group_by_adapter_limit(jobs, 2)
    assert groups == [[0, 1, 2, 4, 6], [3, 5, 7], [8]]
    for members in groups:
        assert len({jobs[i].adapter for i in members} - {None}) <= 2
    assert sorted(i for g in groups for i in g) == list(range(len(jobs)))
    assert group_by_adapter_limit(jobs, 8) == [list(range(9))]
    assert group_by_adapter_limit([job(None)] * 3, 1) == [[0, 1, 2]]


def test_python_m_serve_runs_the_config_on_a_local_ray_unless_one_is_given(monkeypatch):
    import serve.__main__ as entry

    calls = []
    monkeypatch.setattr(entry.os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    entry.main(CONFIG, check_files=False)  # the files: tests/test_serve_cli.py
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    entry.main(CONFIG, check_files=False)
    assert [c[1:] for c in calls] == [
        ["run", "-a", "local", str(CONFIG)],
        ["run", "-a", "http://head:8265", str(CONFIG)],
    ]
    assert Path(calls[0][0]).is_file()  # the venv's serve CLI exists
    with pytest.raises(Exception, match="no such file"):
        entry.main(Path("configs/nope.yaml"))
