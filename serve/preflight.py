"""Checks a Serve config file before `serve run` starts Ray or any replica: the YAML, each
`serve.app:build_app` application's args as ServeSettings, and the files those settings name.

Without it a bad config shows up only inside every replica's traceback, and `serve run` keeps
running. A problem is a ConfigError naming the file, the application and the field:

    configs/x.yaml: applications[0] (rayft).args.tenants: no such file: t.yaml (...)

Relative paths resolve from the current directory, as in `serve run` (and in the replicas it
starts on a local Ray).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from core import storage
from core.config import ConfigError
from serve.config import ServeSettings
from serve.tenants import Tenants

BUILD_APP = "serve.app:build_app"
# org/name or name, as on the Hugging Face hub; anything else that is not a directory is a typo.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def check_serve_config(path: Path, check_files: bool = True) -> list[ServeSettings]:
    """The settings of every build_app application in the Serve config at `path`; ConfigError
    listing every problem found (settings first: files are checked only for valid settings)."""
    problems = []
    found = []
    for where, args, deployments in build_app_args(path):
        try:
            settings = ServeSettings.model_validate(args)
        except ValidationError as e:
            problems += [f"{where}.args{field}: {message}" for field, message in field_errors(e)]
            continue
        found.append(settings)
        problems += [f"{where}.{problem}" for problem in deployment_problems(settings, deployments)]
        if check_files:
            problems += [f"{where}.args.{problem}" for problem in file_problems(settings)]
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    return found


def build_app_args(path: Path) -> list[tuple[str, dict, list]]:
    """(`applications[i] (name)`, args, deployments) for each application that runs
    serve.app:build_app."""
    config = load_yaml(path)
    apps = config.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{path}: no `applications:` list (a Serve config file has one)")
    found = []
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            raise ConfigError(f"{path}: applications[{i}]: not a mapping")
        where = f"applications[{i}] ({app.get('name', 'default')})"
        if app.get("import_path") != BUILD_APP:
            continue
        args = app.get("args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"{path}: {where}.args: not a mapping of ServeSettings fields")
        found.append((where, args, app.get("deployments") or []))
    return found


def deployment_problems(s: ServeSettings, deployments: list) -> list[str]:
    """`deployments:` entries naming a deployment this engine and layout do not have (Serve
    would fail the deploy, after the replicas it could start)."""
    names = {"MultiAdapterServer"}
    if s.resolved_engine == "vllm":
        names.add("VllmServer")
    elif s.resolved_layout == "routed":
        names.add("ModelServer")
    problems = []
    for i, d in enumerate(deployments):
        name = d.get("name") if isinstance(d, dict) else None
        if name not in names:
            problems.append(
                f"deployments[{i}].name: {name!r} is not a deployment of engine "
                f"{s.resolved_engine} (layout {s.resolved_layout}): one of {sorted(names)}"
            )
    return problems


def load_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or e
        raise ConfigError(f"{path}: {at}invalid YAML: {what}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a Serve config (a mapping with `applications:`)")
    return config


def field_errors(e: ValidationError) -> list[tuple[str, str]]:
    """(".field.sub" or "" for the whole args, message) for each error pydantic found."""
    found = []
    for error in e.errors():
        field = "".join(
            f".{part}" if isinstance(part, str) else f"[{part}]" for part in error["loc"]
        )
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "not a setting (the fields are in serve/config.py ServeSettings)"
        found.append((field, message))
    return found


def file_problems(s: ServeSettings) -> list[str]:
    """'field: problem' for each file or directory the settings name that cannot be used."""
    problems = [
        tenants_problem(s.tenants),
        registry_problem(s.registry),
        base_model_problem(s.base_model),
        *adapters_problems(s.adapters),
    ]
    return [p for p in problems if p]


def tenants_problem(tenants: str | None) -> str | None:
    if tenants is None:
        return None
    if not Path(tenants).expanduser().is_file():
        return f"tenants: no such file: {tenants}{from_cwd(tenants)}"
    try:
        Tenants.from_file(Path(tenants).expanduser())
    except ValueError as e:  # "tenants file PATH: what is wrong"
        return f"tenants: {e}"
    return None


def registry_problem(registry: str | None) -> str | None:
    if registry is None:
        return None
    if storage.unsupported(registry):
        return f"registry: {registry}: only local directories and s3:// URIs are supported"
    if storage.is_remote(registry):
        return None  # not listed here: credentials and endpoint may differ on the cluster
    if not Path(registry).expanduser().is_dir():
        return (
            f"registry: no such directory: {registry}{from_cwd(registry)}; promote an adapter "
            f"into it (python -m tune.registry promote RUN --name NAME --registry {registry})"
        )
    return None


def base_model_problem(base_model: str) -> str | None:
    local = Path(base_model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return (
                f"base_model: no config.json in {base_model} (not a transformers model directory)"
            )
        return None
    if storage.unsupported(base_model):
        return f"base_model: {base_model}: only local directories, s3:// URIs and hub ids are supported"
    if storage.is_remote(base_model) or HUB_ID.fullmatch(base_model):
        return None
    return (
        f"base_model: no such directory: {base_model}{from_cwd(base_model)} "
        "(a hub id looks like org/name; the quickstart model: python -m jobs.tiny_model DIR)"
    )


def adapters_problems(adapters: dict[str, str]) -> list[str]:
    if not adapters:
        return []
    # Imported here: serve.adapters imports torch (seconds), which only plain adapters need.
    from serve.adapters import AdapterRegistry

    problems = []
    for name, adapter_dir in adapters.items():  # each on its own, so that all are reported
        try:
            AdapterRegistry(adapters={name: adapter_dir})
        except ValueError as e:  # "adapters.NAME: no peft adapter at PATH (...)"
            problems.append(str(e))
    return problems


def from_cwd(path: str) -> str:
    """Where a relative path was looked for, for the message."""
    return "" if Path(path).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
