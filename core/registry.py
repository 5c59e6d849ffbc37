"""The adapter registry's contract: its names, its layout and which version a plain NAME means.

tune/registry/store.py writes the registry and serve/adapters.py reads it; both take every rule
from here, so a version the writer creates is one the reader accepts and finds.

    ROOT/NAME/VERSION/                  peft adapter files + lineage.json (written last: the commit)
    ROOT/NAME/aliases/ALIAS             a small text file holding a VERSION (replaced atomically)
    ROOT/NAME/aliases/.history/ALIAS/   one object per alias move

NAME and ALIAS follow one rule (NAME_RULE); VERSION is the first 12 hex digits of a hash of the
adapter's weights. A version directory without lineage.json is a copy in progress (or an
interrupted one): no reader counts it. ROOT is a local directory or s3://bucket/prefix; the
functions that read take its fsspec filesystem and path (core.storage.filesystem).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec

log = logging.getLogger(__name__)

NAME_MAX = 63
NAME_RE = re.compile(rf"[a-z0-9][a-z0-9\-_.]{{0,{NAME_MAX - 1}}}")
NAME_RULE = (
    "lowercase letters, digits, '-', '_' or '.', starting with a letter or digit, "
    f"at most {NAME_MAX} characters, no '..'"
)
VERSION_LEN = 12
VERSION_RE = re.compile(rf"[a-f0-9]{{{VERSION_LEN}}}")
VERSION_RULE = f"{VERSION_LEN} lowercase hex characters"

DEFAULT_ALIAS = "production"  # what a plain NAME means when it is set
DEFAULT_ROOT = "runs/registry"  # where the tools and configs/serve.yaml look unless told
ALIASES, HISTORY = "aliases", ".history"
LINEAGE = "lineage.json"
ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------- names


def is_name(text: str) -> bool:
    """A valid NAME or ALIAS. Names become path components: '..' would leave the registry."""
    return isinstance(text, str) and bool(NAME_RE.fullmatch(text)) and ".." not in text


def is_version(text: str) -> bool:
    return isinstance(text, str) and bool(VERSION_RE.fullmatch(text))


# ---------------------------------------------------------------- layout (paths under ROOT)


def version_path(name: str, version: str) -> str:
    return f"{name}/{version}"


def lineage_path(name: str, version: str) -> str:
    return f"{name}/{version}/{LINEAGE}"


def alias_path(name: str, alias: str) -> str:
    return f"{name}/{ALIASES}/{alias}"


def alias_history_path(name: str, alias: str) -> str:
    return f"{name}/{ALIASES}/{HISTORY}/{alias}"


def at(root: str, *paths: str) -> str:
    """A path under ROOT (a filesystem path, as core.storage.filesystem gives it)."""
    return "/".join([root.rstrip("/"), *paths])


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class CommittedVersion:
    version: str
    created: float  # seconds since the epoch: the order "newest" follows
    lineage: dict[str, Any]


def names(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every NAME directory in the registry (it may hold no committed version yet)."""
    found = (_basename(e["name"]) for e in _ls(fs, root) if e.get("type") == "directory")
    return sorted(n for n in found if is_name(n))


def committed_versions(
    fs: fsspec.AbstractFileSystem, root: str, name: str
) -> list[CommittedVersion]:
    """NAME's committed versions, oldest first: by lineage.json's created_at, then by version, so
    that every reader agrees on the newest even when two share a time."""
    found = []
    for entry in _ls(fs, at(root, name)):
        version = _basename(entry["name"])
        if entry.get("type") != "directory" or not is_version(version):
            continue
        text = _cat(fs, at(root, lineage_path(name, version)))
        if text is None:  # not committed (yet)
            continue
        lineage = _lineage(text, name, version)
        created = _created(lineage)
        if created is None:
            log.warning(
                "%s: no readable created_at; its files' time orders it", lineage_path(name, version)
            )
            created = _modified(fs, at(root, version_path(name, version)))
        found.append(CommittedVersion(version, created, lineage))
    return sorted(found, key=lambda v: (v.created, v.version))


def newest_version(fs: fsspec.AbstractFileSystem, root: str, name: str) -> str | None:
    versions = committed_versions(fs, root, name)
    return versions[-1].version if versions else None


def is_committed(fs: fsspec.AbstractFileSystem, root: str, name: str, version: str) -> bool:
    return is_version(version) and fs.exists(at(root, lineage_path(name, version)))


def alias_target(fs: fsspec.AbstractFileSystem, root: str, name: str, alias: str) -> str | None:
    """The committed version ALIAS points at; None when it is not set or points at no committed
    version (a hand-edited or half-deleted registry)."""
    version = _cat(fs, at(root, alias_path(name, alias)))
    if version is None:
        return None
    version = version.strip()
    if not is_committed(fs, root, name, version):
        log.warning("alias %s@%s points at %r, not a committed version", name, alias, version)
        return None
    return version


def resolve(
    fs: fsspec.AbstractFileSystem, root: str, name: str, selector: str | None
) -> str | None:
    """The version NAME (None selector), NAME@VERSION or NAME@ALIAS means now; None when none.
    A plain NAME is its DEFAULT_ALIAS when set, else its newest committed version."""
    if selector is None:
        return alias_target(fs, root, name, DEFAULT_ALIAS) or newest_version(fs, root, name)
    if is_committed(fs, root, name, selector):
        return selector
    return alias_target(fs, root, name, selector)


def _ls(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    try:  # refresh: a cached S3 listing would miss what another process just wrote
        return fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []


def _cat(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    try:
        return fs.cat_file(path).decode()
    except FileNotFoundError:
        return None


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _lineage(text: str, name: str, version: str) -> dict[str, Any]:
    try:
        lineage = json.loads(text)
    except ValueError:
        lineage = None
    if not isinstance(lineage, dict):
        log.warning("%s/%s/%s is not a JSON object", name, version, LINEAGE)
        return {}
    return lineage


def _created(lineage: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(lineage["created_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def _modified(fs: fsspec.AbstractFileSystem, version_dir: str) -> float:
    """When a version's files were written: S3 prefixes have no time of their own, files do."""
    try:
        info = fs.info(f"{version_dir}/{ADAPTER_CONFIG}")
    except FileNotFoundError:
        return 0.0
    mtime = info.get("mtime") or info.get("LastModified") or 0
    return mtime.timestamp() if isinstance(mtime, datetime) else float(mtime)
