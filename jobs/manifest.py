"""run.json: what a run was made from (config, base model, data hash, code, libraries) and what it scored."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(
    r"(api[_-]?key|token|secret|password|credential|access[_-]?key)", re.IGNORECASE
)
LIBRARIES = [
    "torch",
    "ray",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "rayft",
]


def redact(value: Any) -> Any:
    """A copy of a config tree with the values of secret-looking keys replaced."""
    if isinstance(value, dict):
        return {
            k: "***" if SECRET_KEY.search(str(k)) and v else redact(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state(cwd: str | Path = ".") -> dict[str, Any]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"sha": sha.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": None, "dirty": None}


def write_run_manifest(path: Path, **fields: Any) -> dict[str, Any]:
    manifest = {
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "libraries": library_versions(),
        "code": git_state(),
    }
    manifest["config"] = redact(manifest.get("config", {}))
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
