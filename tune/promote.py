"""Promotion: a run's adapter goes into the registry only if it is servable and passed its gate
(`force` skips the gate, and the lineage says so). The lineage ties the version to its run,
dataset, config, code and evaluation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from jobs.config import ConfigError, ModelConfig
from jobs.model import resolve_model_path
from jobs.storage import local_copy
from tune.registry import Registry, RegistryError
from tune.servability import ServingLimits, servability_problems


def base_fingerprint(base_dir: Path) -> str | None:
    """A cheap identity of a local base model: its config and its weight files' names and sizes
    (hashing multi-GB weights on every promotion would cost minutes)."""
    if not (base_dir / "config.json").is_file():
        return None
    h = hashlib.sha256((base_dir / "config.json").read_bytes())
    for f in sorted(base_dir.glob("*.safetensors")) + sorted(base_dir.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "sha256:" + h.hexdigest()


def lineage_of(
    run_dir: Path,
    evaluation: dict[str, Any] | None,
    gate: dict[str, Any],
    base_dir: Path | None = None,
    uri: str | None = None,
) -> dict[str, Any]:
    """`uri` is where the run lives when `run_dir` is a temporary copy of it (s3://...)."""
    run = json.loads((run_dir / "run.json").read_text())
    data_manifest = run_dir / "data" / "manifest.json"
    sources = json.loads(data_manifest.read_text())["sources"] if data_manifest.is_file() else None
    return {
        "base_model": run.get("base_model"),
        "base_model_revision": run.get("config", {}).get("model", {}).get("revision"),
        "base_model_fingerprint": base_fingerprint(base_dir) if base_dir else None,
        "dataset_hash": run.get("dataset_hash"),
        "data_sources": sources,
        "run": {
            "name": run.get("run_name"),
            "dir": uri or str(run_dir.resolve()),
            "checkpoint": run.get("checkpoint"),
            "steps": run.get("steps"),
        },
        "sweep": run.get("sweep"),
        "config": run.get("config"),
        "metrics": run.get("metrics"),
        "evaluation": evaluation,
        "gate": gate,
        "code": run.get("code"),
        "libraries": run.get("libraries"),
    }


def promote_run(
    registry: Registry,
    run_dir: str | Path,
    name: str,
    alias: str = "production",
    force: bool = False,
    limits: ServingLimits | None = None,
    evaluation: dict[str, Any] | None = None,
    lineage_extra: dict[str, Any] | None = None,
) -> str:
    """Register RUN_DIR/adapter as NAME/VERSION and point ALIAS at it; returns the version.

    The gate is read from `evaluation` when given (a pipeline's own evaluation), else from
    RUN/eval.json; `lineage_extra` adds keys to lineage.json (the pipeline that promoted it).
    An s3:// run is read from a temporary copy; its lineage names the s3:// URI."""
    uri = str(run_dir).rstrip("/")
    with local_copy(uri, ("run.json", "eval.json", "adapter", "data")) as run_dir:
        adapter = run_dir / "adapter"
        if not (run_dir / "run.json").is_file() or not adapter.is_dir():
            raise RegistryError(f"{uri}: not a finished run (needs adapter/ and run.json)")
        run = json.loads((run_dir / "run.json").read_text())
        base_dir = Path(resolve_model_path(ModelConfig(name_or_path=run["base_model"])))
        problems = servability_problems(adapter, base_dir, limits or ServingLimits())
        if problems:
            raise RegistryError(f"{uri}: not servable: " + "; ".join(problems))
        eval_path = run_dir / "eval.json"
        if evaluation is None and eval_path.is_file():
            evaluation = json.loads(eval_path.read_text())
        gate = (evaluation or {}).get("gate")
        if force:
            gate = {**(gate or {}), "forced": True}
        elif gate is None:
            raise RegistryError(
                f"{uri}: no gate result; run `python -m tune.evaluate {uri} EVAL.yaml` "
                "(with a gate section) first, or promote with --force"
            )
        elif not gate["passed"]:
            raise RegistryError(f"{uri}: the gate failed: " + "; ".join(gate["reasons"]))
        try:
            lineage = {
                **lineage_of(run_dir, evaluation, gate, base_dir, uri if "://" in uri else None),
                **(lineage_extra or {}),
            }
            version = registry.register(adapter, name, lineage)
        except OSError as e:
            raise ConfigError(
                f"registry {registry.root}: cannot write: {type(e).__name__}: {e}"
            ) from None
    registry.set_alias(name, alias, version, reason="promote" + (" (forced)" if force else ""))
    return version
