"""`python -m serve CONFIG` checks the config before Ray starts (serve/preflight.py): a bad one
exits 2 with one message naming the file, the application and the field, and starts nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError
from serve.preflight import check_serve_config
from tests.helpers import REPO

SERVE_YAML = REPO / "configs/serve.yaml"
TENANTS = REPO / "configs/serve-tenants.example.yaml"
APP = "applications[0] (rayft).args"


def serve_yaml_with(tmp_path: Path, name: str = "serve.yaml", **args) -> Path:
    """configs/serve.yaml with some args replaced (None: removed), written to tmp_path/name."""
    config = yaml.safe_load(SERVE_YAML.read_text())
    app_args = config["applications"][0]["args"]
    app_args.update(args)
    for key in [k for k, v in args.items() if v is None]:
        del app_args[key]
    out = tmp_path / name
    out.write_text(yaml.safe_dump(config))
    return out


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A directory with what configs/serve.yaml needs, under relative names: a registry, a base
    model directory (config.json is all the preflight reads) and a tenants file."""
    (tmp_path / "registry").mkdir()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "tenants.yaml").write_text(TENANTS.read_text())
    return tmp_path


def python_m_serve(config: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `python -m serve CONFIG` in cwd with a Ray temp dir of its own, which Ray would create
    on start. The timeout only keeps a hung run from hanging the suite."""
    ray_tmp = cwd / "ray-tmp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "serve", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return done, ray_tmp


def bad_yaml(workdir: Path) -> Path:
    out = workdir / "syntax.yaml"
    out.write_text("applications:\n  - name: rayft\n    args: {base_model: [base\n")
    return out


CASES = {
    "missing tenants file": (
        lambda d: serve_yaml_with(d, registry="registry", base_model="base", tenants="nope.yaml"),
        f"{APP}.tenants: no such file: nope.yaml",
    ),
    "unknown field": (
        lambda d: serve_yaml_with(
            d, registry="registry", base_model="base", tenants="tenants.yaml", max_tokens=5
        ),
        f"{APP}.max_tokens: not a setting",
    ),
    "missing adapter directory": (
        lambda d: serve_yaml_with(
            d,
            registry="registry",
            base_model="base",
            tenants="tenants.yaml",
            adapters={"support": "adapters/support"},
        ),
        f"{APP}.adapters.support: no peft adapter at adapters/support",
    ),
    "YAML syntax error": (bad_yaml, "line 4, column 1: invalid YAML"),
}


@pytest.mark.integration  # the CLI in a subprocess
@pytest.mark.parametrize("case", CASES)
def test_a_bad_config_exits_2_naming_the_field_before_ray_starts(workdir, case):
    make_config, message = CASES[case]
    config = make_config(workdir)
    done, ray_tmp = python_m_serve(config, cwd=workdir)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert done.stderr.startswith(f"error: {config}: "), output
    assert message in done.stderr, output
    assert len(done.stderr.strip().splitlines()) == 1, output  # this problem only
    assert "Traceback" not in output
    # Nothing of Ray ran: no start banner, no `serve run`, no session directory.
    assert "Ray instance" not in output and "Deploying" not in output
    assert not ray_tmp.exists()


def test_configs_serve_yaml_passes_with_a_registry_and_base_model_that_exist(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.chdir(REPO)  # where the shipped relative tenants path points from
    registry = tmp_path / "registry"
    registry.mkdir()
    config = serve_yaml_with(tmp_path, registry=str(registry), base_model=str(tiny_model_dir))
    (settings,) = check_serve_config(config)
    assert settings.registry == str(registry) and settings.resolved_engine == "vllm"


@pytest.mark.parametrize(
    "text, message",
    [
        ("- just\n- a list\n", "not a Serve config"),
        ("proxy_location: EveryNode\n", "no `applications:` list"),
        ("applications: []\n", "no `applications:` list"),
        ("applications:\n  - 3\n", "applications[0]: not a mapping"),
    ],
)
def test_a_config_that_is_not_a_serve_config_says_so(tmp_path, text, message):
    config = tmp_path / "x.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{config}: .*{message}".replace("[", r"\[")):
        check_serve_config(config)


def test_every_problem_is_reported_at_once_and_files_can_be_left_unchecked(tmp_path):
    config = serve_yaml_with(
        tmp_path, registry="no-registry", base_model="./no-model", tenants="no-tenants.yaml"
    )
    with pytest.raises(ConfigError) as raised:
        check_serve_config(config)
    lines = str(raised.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        f"{APP}.tenants",
        f"{APP}.registry",
        f"{APP}.base_model",
    ]
    # For a cluster whose nodes hold the files: the YAML and the settings are still checked.
    assert len(check_serve_config(config, check_files=False)) == 1
    bad = serve_yaml_with(tmp_path, "bad.yaml", max_batch_size=100)
    with pytest.raises(ConfigError, match=r"args: max_ongoing_requests \(64\) must be at least"):
        check_serve_config(bad, check_files=False)


@pytest.mark.parametrize("config", ["configs/serve.yaml", "configs/serve-routed.yaml"])
def test_shipped_serve_configs_pass_the_settings_checks(config):
    (settings,) = check_serve_config(REPO / config, check_files=False)
    assert settings.tenants == "configs/serve-tenants.example.yaml"


def test_a_deployment_the_engine_does_not_have_is_named(tmp_path):
    raw = yaml.safe_load(SERVE_YAML.read_text())
    raw["applications"][0]["args"]["engine"] = "hf"  # configs/serve.yaml names VllmServer
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match=r"deployments\[0\]\.name: 'VllmServer' is not a deployment of engine hf"
    ):
        check_serve_config(bad, check_files=False)
