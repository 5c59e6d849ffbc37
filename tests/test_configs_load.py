"""Every shipped config loads through the loader of the command that reads it.

One test per file, found by a glob: a new config file that no loader here knows fails, so a config
cannot ship that nothing checks. No Ray starts and no model is read: loaders validate at load time.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    [*ROOT.glob("configs/*.yaml"), *ROOT.glob("tests/fixtures/*/prepare.yaml")],
)


def load_job(path: Path):
    from jobs.config import JobConfig, load_config

    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    return cfg


def load_prepare(path: Path):
    from jobs.data.prepare import PrepareConfig, load_prepare_config

    cfg = load_prepare_config(path)
    assert isinstance(cfg, PrepareConfig)
    return cfg


def load_sweep(path: Path):
    from tune.sweep import SweepConfig, load_sweep_config

    cfg = load_sweep_config(path)  # also loads the job of a trial with each key's first value
    assert isinstance(cfg, SweepConfig)
    return cfg


def load_eval(path: Path):
    from tune.evaluate import EvalSuiteConfig, load_eval_config

    cfg = load_eval_config(path)
    assert isinstance(cfg, EvalSuiteConfig)
    return cfg


def load_pipeline(path: Path):
    from tune.pipeline import load_pipeline_config

    loaded = load_pipeline_config(path)  # with the sweep, job, eval and serve files it names
    assert loaded.cfg.name
    return loaded


def load_serve(path: Path):
    """A `serve run` config: Serve's own schema, and each application's args as ServeSettings
    (what serve.app:build_app validates them against)."""
    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServeSettings

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    settings = [ServeSettings.model_validate(app.args) for app in schema.applications]
    assert settings
    return settings


def load_tenants(path: Path):
    from serve.tenants import Tenants

    return Tenants.from_file(path)


# File name patterns, first match wins; job configs are known by their run and model sections.
LOADERS: list[tuple[str, Callable[[Path], object]]] = [
    ("sweep*.yaml", load_sweep),
    ("eval*.yaml", load_eval),
    ("pipeline*.yaml", load_pipeline),
    ("serve-tenants*.yaml", load_tenants),
    ("serve*.yaml", load_serve),
    ("prepare*.yaml", load_prepare),
]


def loader_for(path: Path) -> Callable[[Path], object] | None:
    for pattern, loader in LOADERS:
        if fnmatch(path.name, pattern):
            return loader
    raw = yaml.safe_load(path.read_text()) or {}
    if isinstance(raw, dict) and "run" in raw and "model" in raw:
        return load_job
    return None


def test_the_glob_finds_the_shipped_configs():
    names = {p.name for p in SHIPPED}
    assert {"quickstart.yaml", "dpo.yaml", "serve.yaml", "pipeline.yaml", "prepare.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name files relative to the repository root
    # the pipeline's canary key, as its README section exports it (the example tenant's key)
    monkeypatch.setenv("RAYFT_API_KEY", "sk-example-beta-not-a-real-key")
    loader = loader_for(path)
    assert loader is not None, (
        f"{path.relative_to(ROOT)}: no loader knows this config; add its command's loader to "
        "LOADERS in tests/test_configs_load.py"
    )
    loader(path.relative_to(ROOT))
