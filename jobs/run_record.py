"""run.json: what a run was made from (config, base model, data hash, code, libraries) and what it scored."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
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
    "deepspeed",
    "trl",
    "wandb",
    "mlflow-skinny",
    "rayft",
]
# The code of this job: what `git_state` describes by default, wherever the process's cwd is.
CODE_ROOT = Path(__file__).resolve().parents[1]
# Set by whoever ships the code without its .git (e.g. `ray job submit --working-dir`, which
# excludes .git): RAYFT_GIT_SHA=$(git rev-parse HEAD), RAYFT_GIT_DIRTY=true|false.
GIT_SHA_ENV, GIT_DIRTY_ENV = "RAYFT_GIT_SHA", "RAYFT_GIT_DIRTY"
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:]+(:[^/@\s]*)?@")


def redact(value: Any) -> Any:
    """A copy of a config tree with the values of secret-looking keys replaced, and credentials
    inside URLs (https://user:pass@host) too."""
    if isinstance(value, dict):
        return {k: "***" if is_secret_key(k) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return URL_CREDENTIALS.sub("***@", value)
    return value


def scrub(text: str) -> str:
    """Text (an error message, a log line) with URL credentials and the values of this process's
    secret-looking environment variables (WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...) masked."""
    text = URL_CREDENTIALS.sub("***@", text)
    for key, value in os.environ.items():
        if len(value) >= 6 and is_secret_key(key) and value in text:
            text = text.replace(value, "***")
    return text


def library_versions() -> dict[str, str | None]:
    """Python and the installed versions of LIBRARIES ("not installed" for an absent optional one),
    plus the CUDA version torch was built for (None on a CPU build)."""
    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["torch_cuda"] = torch.version.cuda
    return versions


def git_state(cwd: str | Path = CODE_ROOT) -> dict[str, Any]:
    """The commit of the code in `cwd` and whether tracked files differ from it (`source: git`).
    Without a repository (a `ray job submit --working-dir` copy has no .git) the commit comes from
    RAYFT_GIT_SHA / RAYFT_GIT_DIRTY when the submitter set them (`source: env`), else null."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        # only the code's own repository: a copy unpacked somewhere inside another repository
        # (a home directory under git) must not report that repository's commit
        own = top.returncode == 0 and Path(top.stdout.strip()).resolve() == Path(cwd).resolve()
        sha = git("rev-parse", "HEAD") if own else top
        if own and sha.returncode == 0:
            dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
            return {"sha": sha.stdout.strip(), "dirty": dirty, "source": "git"}
    except (OSError, subprocess.TimeoutExpired):
        pass
    if os.environ.get(GIT_SHA_ENV):
        dirty = os.environ.get(GIT_DIRTY_ENV, "").lower()
        return {
            "sha": os.environ[GIT_SHA_ENV],
            "dirty": {"true": True, "1": True, "false": False, "0": False}.get(dirty),
            "source": "env",
        }
    return {"sha": None, "dirty": None, "source": None}


def hardware() -> dict[str, Any]:
    """This machine: CPU model and count, memory, GPUs (names and memory from nvidia-smi, so that
    no CUDA context is created in a driver process that does not train)."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu_model = platform.processor() or None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
                name, mem = (part.strip() for part in line.rsplit(",", 1))
                gpus.append({"name": name, "memory_gb": round(float(mem) / 1024, 1)})
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return {
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb,
        "gpu_count": len(gpus),
        "gpus": gpus,
    }


def ray_cluster() -> dict[str, Any] | None:
    """The Ray cluster this process is connected to: its version and each alive node's resources
    (CPUs, GPUs, accelerator type, memory); None when Ray is not running here."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        nodes = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            nodes.append(
                {
                    "cpus": res.get("CPU", 0),
                    "gpus": res.get("GPU", 0),
                    "accelerator": next(
                        (k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None
                    ),
                    "memory_gb": round(res.get("memory", 0) / 2**30, 1),
                }
            )
        return {"ray_version": ray.__version__, "nodes": nodes}
    except Exception:  # a cluster that cannot be asked does not fail the run's record
        return None


def write_run_manifest(path: Path, **fields: Any) -> dict[str, Any]:
    """run.json: `fields` (config redacted) plus the libraries, the code's commit and the hardware
    (this machine's and the Ray cluster's nodes)."""
    manifest = {
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "libraries": library_versions(),
        "code": git_state(),
        "hardware": {"driver": hardware(), "ray_cluster": ray_cluster()},
    }
    manifest["config"] = redact(manifest.get("config", {}))
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
