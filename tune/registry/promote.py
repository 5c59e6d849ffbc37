"""Promotion: a run's adapter goes into the registry only if it is servable and passed its gate
(`force` skips the gate, and the lineage says so). The lineage ties the version to its run,
dataset, config, code and evaluation.

`gate_and_promote` is the one path from an evaluated run to a moved alias, taken by the sweep
(tune/sweep.py) and by the pipeline (tune/pipeline.py); `promote_run` is what it and
`python -m tune.registry promote` call once the gate is known."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import ConfigError
from core.registry import DEFAULT_ALIAS
from core.storage import is_remote, local_copy
from inference.config import ModelConfig
from inference.model import resolve_model_path
from tune.registry.store import Registry, RegistryError, adapter_version
from tune.servability import ServingLimits, servability_problems

RUN_PARTS = ("run.json", "eval.json", "adapter", "data")  # what promotion reads of a run


@dataclass
class Promotion:
    """What gate_and_promote did: promoted (the alias points at `version`) or why not."""

    promoted: bool
    version: str | None = None
    previous: str | None = None  # the alias's version before
    moved: bool = False  # False when the alias already pointed at `version`
    reason: str = ""  # why it was not promoted


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


def gate_and_promote(
    registry: Registry,
    run_dir: str | Path,
    name: str,
    alias: str,
    evaluation: dict[str, Any],
    limits: ServingLimits | None = None,
    lineage_extra: dict[str, Any] | None = None,
) -> Promotion:
    """Promote an evaluated run if the gate in `evaluation` (tune.evaluate's results) passed;
    a failed or missing gate is a Promotion that says why, not an error."""
    gate = evaluation.get("gate")
    if not (gate and gate["passed"]):
        return Promotion(False, reason="; ".join((gate or {}).get("reasons", ["no gate"])))
    return _promote(registry, run_dir, name, alias, False, limits, evaluation, lineage_extra)


def promote_run(
    registry: Registry,
    run_dir: str | Path,
    name: str,
    alias: str = DEFAULT_ALIAS,
    force: bool = False,
    limits: ServingLimits | None = None,
    evaluation: dict[str, Any] | None = None,
    lineage_extra: dict[str, Any] | None = None,
) -> str:
    """Register RUN_DIR/adapter as NAME/VERSION and point ALIAS at it; returns the version.

    The gate is read from `evaluation` when given (a pipeline's own evaluation), else from
    RUN/eval.json; `lineage_extra` adds keys to lineage.json (the pipeline that promoted it).
    An s3:// run is read from a temporary copy; its lineage names the s3:// URI."""
    args = (limits, evaluation, lineage_extra)
    return _promote(registry, run_dir, name, alias, force, *args).version


def _promote(registry, run_dir, name, alias, force, limits, evaluation, lineage_extra) -> Promotion:
    uri = str(run_dir).rstrip("/")
    with local_copy(uri, RUN_PARTS) as local:
        adapter = local / "adapter"
        if not (local / "run.json").is_file() or not adapter.is_dir():
            raise RegistryError(f"{uri}: not a finished run (needs adapter/ and run.json)")
        base_dir = servable_base(local, uri, limits or ServingLimits())
        if evaluation is None and (local / "eval.json").is_file():
            evaluation = json.loads((local / "eval.json").read_text())
        gate = checked_gate(uri, (evaluation or {}).get("gate"), force)
        previous = registry.aliases(name).get(alias)
        if adapter_version(adapter) == previous:  # promoted before: no alias move to record
            return Promotion(True, previous, previous, moved=False)
        lineage = {
            **lineage_of(local, evaluation, gate, base_dir, uri if is_remote(uri) else None),
            **(lineage_extra or {}),
        }
        try:
            version = registry.register(adapter, name, lineage)
        except OSError as e:
            raise ConfigError(
                f"registry {registry.root}: cannot write: {type(e).__name__}: {e}"
            ) from None
    registry.set_alias(name, alias, version, reason="promote" + (" (forced)" if force else ""))
    return Promotion(True, version, previous, moved=True)


def servable_base(run_dir: Path, uri: str, limits: ServingLimits) -> Path:
    """The run's base model directory, once the server is known to be able to serve the adapter
    on it."""
    run = json.loads((run_dir / "run.json").read_text())
    base_dir = Path(resolve_model_path(ModelConfig(name_or_path=run["base_model"])))
    problems = servability_problems(run_dir / "adapter", base_dir, limits)
    if problems:
        raise RegistryError(f"{uri}: not servable: " + "; ".join(problems))
    return base_dir


def checked_gate(uri: str, gate: dict[str, Any] | None, force: bool) -> dict[str, Any]:
    """The gate a promotion records: a passed one, or any one marked forced."""
    if force:
        return {**(gate or {}), "forced": True}
    if gate is None:
        raise RegistryError(
            f"{uri}: no gate result; run `python -m tune.evaluate {uri} EVAL.yaml` "
            "(with a gate section) first, or promote with --force"
        )
    if not gate["passed"]:
        raise RegistryError(f"{uri}: the gate failed: " + "; ".join(gate["reasons"]))
    return gate
