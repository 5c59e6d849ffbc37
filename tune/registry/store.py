"""The adapter registry's writer: a directory tree on local disk or s3:// that serving reads.

Its names, layout and "newest version" rule are core/registry.py, which serving reads by too:

    ROOT/NAME/VERSION/                  peft adapter files + lineage.json (written last: the commit)
    ROOT/NAME/aliases/ALIAS             a small text file holding a VERSION (replaced atomically)
    ROOT/NAME/aliases/.history/ALIAS/   one object per alias move, so concurrent writers never
                                        read-modify-write a shared file

VERSION is a content hash of the adapter weights: promoting the same weights twice gives the same
version (and the second promotion writes nothing new). `rollback` moves an alias back to the
version it pointed at before its last move. The command line is tune/registry/cli.py
(`python -m tune.registry ...`); promotion, which checks a run before it is registered, is
tune/registry/promote.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open

from core import registry as contract
from core.config import ConfigError
from core.registry import (
    ALIASES,
    DEFAULT_ALIAS,
    NAME_RULE,
    VERSION_LEN,
    VERSION_RULE,
    alias_history_path,
    alias_path,
    lineage_path,
    version_path,
)
from core.storage import filesystem, protocol


class RegistryError(ConfigError):
    """A registry operation that cannot be done; the message says what and where."""


class NotInRegistry(RegistryError):
    """A name, version or alias the registry does not hold; the message says what it holds."""


def check_name(name: str, what: str = "name") -> str:
    """Names become path components: validated before the filesystem or object store is touched."""
    if not contract.is_name(name):
        raise RegistryError(f"invalid {what} {name!r}: use {NAME_RULE}")
    return name


def check_version(version: str) -> str:
    if not contract.is_version(version):
        raise RegistryError(f"invalid version {version!r}: {VERSION_RULE}")
    return version


def adapter_version(adapter_dir: Path) -> str:
    """Content hash of the adapter's tensors (names, dtypes, shapes, bytes), not of file bytes."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise RegistryError(f"{adapter_dir}: no adapter_model.safetensors (not a peft adapter)")
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:VERSION_LEN]


@dataclass
class Registry:
    root: str

    def __post_init__(self):
        self.fs, self.base = filesystem(self.root)

    # ------------------------------------------------------------ paths and small files

    def _path(self, *paths: str) -> str:
        return contract.at(self.base, *paths)

    def _read(self, path: str) -> str | None:
        try:
            with self.fs.open(self._path(path), "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write_atomic(self, text: str, path: str) -> None:
        """Readers see the old content or the new, never half a file (local: rename; S3: PUT)."""
        path = self._path(path)
        folder, filename = path.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            # a leading dot: no listing mistakes the half-written file for an alias or a name
            tmp = f"{folder}/.{filename}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w") as f:
                f.write(text)

    # ------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return contract.names(self.fs, self.base)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Complete versions (lineage.json present), oldest first (the last is the newest)."""
        check_name(name)
        return [
            {**v.lineage, "version": v.version}
            for v in contract.committed_versions(self.fs, self.base, name)
        ]

    def aliases(self, name: str) -> dict[str, str]:
        check_name(name)
        folder = self._path(name, ALIASES)
        if not self.fs.exists(folder):
            return {}
        out = {}
        for p in self.fs.ls(folder, detail=False):
            alias = p.rstrip("/").rsplit("/", 1)[-1]
            if contract.is_name(alias) and not self.fs.isdir(p):
                out[alias] = (self._read(alias_path(name, alias)) or "").strip()
        return out

    def resolve(self, ref: str) -> tuple[str, str]:
        """NAME, NAME@VERSION or NAME@ALIAS -> (name, version); NAME alone is the default alias
        (production) if set, else the newest version."""
        name, sep, selector = ref.partition("@")
        check_name(name)
        if sep and not contract.is_version(selector):
            check_name(selector, "alias")
        version = contract.resolve(self.fs, self.base, name, selector if sep else None)
        if version is None:
            raise self._no_such(name, selector)
        return name, version

    def _no_such(self, name: str, selector: str = "") -> NotInRegistry:
        """What was asked for is missing: say what the registry (or the name) does hold."""
        versions = ", ".join(v["version"] for v in self.versions(name))
        if not versions:
            names = [n for n in self.names() if self.versions(n)]
            held = f"it holds {', '.join(names)}" if names else "it is empty"
            return NotInRegistry(f"{name}: not in the registry at {self.root} ({held})")
        aliases = ", ".join(self.aliases(name)) or "none"
        return NotInRegistry(
            f"{name}@{selector}: no such version or alias in {self.root} "
            f"({name} has versions {versions}; aliases {aliases})"
        )

    def lineage(self, ref: str) -> dict[str, Any]:
        name, version = self.resolve(ref)
        text = self._read(lineage_path(name, version))
        if text is None:
            raise RegistryError(f"{name}@{version}: no such version in {self.root}")
        return json.loads(text)

    def adapter_uri(self, ref: str) -> str:
        name, version = self.resolve(ref)
        return protocol(self.root) + self._path(version_path(name, version))

    # ------------------------------------------------------------ writing

    def register(self, adapter_dir: Path, name: str, lineage: dict[str, Any]) -> str:
        """Copy an adapter in as NAME/VERSION; lineage.json goes last, so a version without it
        is an interrupted copy that readers ignore and the next promotion completes."""
        check_name(name)
        version = adapter_version(adapter_dir)
        if self._read(lineage_path(name, version)):
            return version  # same weights already here: content addressing makes this a no-op
        dest = self._path(version_path(name, version))
        for f in sorted(Path(adapter_dir).rglob("*")):
            if f.is_file():
                target = f"{dest}/{f.relative_to(adapter_dir).as_posix()}"
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(f), target)
        record = {
            **lineage,
            "name": name,
            "version": version,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        }
        self._write_atomic(json.dumps(record, indent=2, default=str), lineage_path(name, version))
        return version

    def set_alias(self, name: str, alias: str, version: str, reason: str = "set") -> None:
        check_name(name)
        check_name(alias, "alias")
        check_version(version)
        if not self._read(lineage_path(name, version)):
            raise RegistryError(f"{name}@{version}: no such version in {self.root}")
        event = {"version": version, "reason": reason, "at": time.time()}
        # one object per move: a unique, time-ordered name, never rewritten
        stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._write_atomic(json.dumps(event), f"{alias_history_path(name, alias)}/{stamp}")
        self._write_atomic(version, alias_path(name, alias))

    def alias_history(self, name: str, alias: str) -> list[dict[str, Any]]:
        folder = alias_history_path(name, alias)
        if not self.fs.exists(self._path(folder)):
            return []
        events = []
        for p in sorted(self.fs.ls(self._path(folder), detail=False)):
            if ".tmp-" not in p:
                events.append(json.loads(self._read(f"{folder}/{p.rsplit('/', 1)[-1]}")))
        return events

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> str:
        """Point the alias at the version before its last move (a rollback undoes one set)."""
        check_name(name)
        check_name(alias, "alias")
        stack: list[str] = []
        for event in self.alias_history(name, alias):
            if event["reason"] == "rollback":
                stack.pop()
            else:
                stack.append(event["version"])
        if len(stack) < 2:
            raise RegistryError(f"{name}@{alias}: no earlier version to roll back to")
        previous = stack[-2]
        self.set_alias(name, alias, previous, reason="rollback")
        return previous

    def delete(self, name: str, version: str) -> None:
        check_name(name)
        check_version(version)
        using = [a for a, v in self.aliases(name).items() if v == version]
        if using:
            raise RegistryError(
                f"{name}@{version} is what {', '.join(using)} points at: move the alias first"
            )
        if not self.fs.exists(self._path(version_path(name, version))):
            raise RegistryError(f"{name}@{version}: no such version in {self.root}")
        # uncommitted first: readers skip it from now on
        self.fs.rm(self._path(lineage_path(name, version)))
        self.fs.rm(self._path(version_path(name, version)), recursive=True)


def lineage_chain(lineage: dict[str, Any]) -> list[str]:
    """A version's lineage as the chain a reader follows from an answer's x-adapter-version
    header back to the training data: version -> run -> dataset -> source files, and code."""
    run, code, gate = lineage.get("run") or {}, lineage.get("code") or {}, lineage.get("gate") or {}
    lines = [
        f"adapter   {lineage['name']}@{lineage['version']}  (created {lineage.get('created_at', '?')[:19]})",
        f"base      {lineage.get('base_model')}",
        f"run       {run.get('name')}  {run.get('dir')}  ({run.get('steps')} steps)",
    ]
    if lineage.get("sweep"):
        sweep = lineage["sweep"]
        lines.append(
            f"sweep     {sweep.get('name')} trial {sweep.get('trial')} {sweep.get('params')}"
        )
    if lineage.get("pipeline"):
        p = lineage["pipeline"]
        lines.append(f"pipeline  {p.get('name')}  {p.get('config')}  stages {p.get('stages')}")
    if gate:
        verdict = "forced" if gate.get("forced") else ("passed" if gate.get("passed") else "failed")
        lines.append(
            f"gate      {verdict}  {gate.get('metric')}: {gate.get('adapter')} vs {gate.get('best_baseline')} {gate.get('baseline')}"
        )
    lines.append(f"dataset   {lineage.get('dataset_hash')}")
    for source in lineage.get("data_sources") or []:
        for f in source.get("files", []):
            lines.append(
                f"  source  {f['url']}  {f['rows']} rows  {f['sha256']}  (split {source.get('split')})"
            )
    dirty = " (uncommitted changes)" if code.get("dirty") else ""
    lines.append(f"code      {code.get('sha')}{dirty}")
    return lines
