"""`ray job submit --working-dir . -- python -m jobs.finetune CONFIG` against a real `ray start --head`.

The head runs with token authentication, its token given through RAY_AUTH_TOKEN so the test never
reads or writes ~/.ray. It is stopped through its own process group: `ray stop` would stop every
Ray process on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ports import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    token = secrets.token_hex(16)
    dashboard_port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rft", dir="/tmp")  # Ray needs a short socket path
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # submitted jobs resolve `python` here
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_worker_niceness": "0",
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 90
    while True:
        try:
            request = urllib.request.Request(
                f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}
            )
            urllib.request.urlopen(request, timeout=2)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"ray head did not come up at {address}")
            time.sleep(1)
    yield {"address": address, "env": env}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head, env, *job_args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
           "--", "python", "-m", "jobs.finetune", *job_args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_submitted_job_trains_and_writes_the_adapter(head, tiny_model_dir, tmp_path):
    result = submit(
        head, head["env"], "configs/quickstart.yaml", "run.name=submitted",
        f"model.name_or_path={tiny_model_dir}", f"checkpoint.storage_path={tmp_path}",
        "train.max_steps=4", "eval.every_steps=null", "eval.early_stopping_patience=null",
        "checkpoint.every_steps=null", "eval.max_generate_samples=8",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr)
    assert (tmp_path / "submitted" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "submitted" / "run.json").is_file()


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
