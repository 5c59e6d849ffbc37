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

# Matched against a key's lower-cased words (camelCase and '-' become '_'): a whole word only, so
# HF_TOKEN, apiKey and aws_secret_access_key are secrets but eval.max_new_tokens and tokenizer are not.
SECRET_KEY = re.compile(
    r"(?<![a-z])(api_?key|access_?key|token|secrets?|passwords?|credentials?)(?![a-z])"
)


def is_secret_key(key: Any) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower().replace("-", "_")
    return bool(SECRET_KEY.search(words))


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
        return {k: "***" if is_secret_key(k) and v else redact(v) for k, v in value.items()}
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
