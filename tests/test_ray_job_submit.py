"""`ray job submit --working-dir . -- python -m jobs.finetune CONFIG` against a real `ray start --head`.

The head (tests/conftest.py) runs with token authentication.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import BIN, REPO

pytestmark = pytest.mark.integration


def submit(head, env, *job_args, timeout=300, runtime_env=None) -> subprocess.CompletedProcess:
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["address"],
        "--working-dir",
        str(REPO),
        *extra,
        "--",
        "python",
        "-m",
        "jobs.finetune",
        *job_args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_submitted_job_trains_and_keeps_its_results(head, tiny_model_dir, tmp_path):
    result = submit(
        head,
        head["env"],
        "configs/quickstart.yaml",
        "run.name=submitted",
        f"model.name_or_path={tiny_model_dir}",
        "train.max_steps=4",
        "eval.every_steps=null",
        "eval.early_stopping_patience=null",
        "checkpoint.every_steps=null",
        "eval.max_generate_samples=8",
        runtime_env={"env_vars": {"HOME": str(tmp_path)}},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr)
    # The relative storage path (runs/) is not left inside Ray's temporary copy of the repo.
    run_dir = tmp_path / "runs" / "submitted"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "run.json").is_file()
    assert f"adapter: {run_dir / 'adapter'}" in result.stdout


def test_a_bad_config_fails_the_submit_with_the_cause(head, tmp_path):
    result = submit(head, head["env"], "configs/quickstart.yaml", "train.lrr=1", timeout=120)
    assert result.returncode != 0
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in result.stdout + result.stderr


def test_a_submit_without_the_token_is_rejected(head, tmp_path):
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    result = submit(head, env, "configs/quickstart.yaml", timeout=120)
    assert result.returncode != 0
    assert "auth" in (result.stdout + result.stderr).lower(), (
        result.stdout[-2000:] + result.stderr[-2000:]
    )
