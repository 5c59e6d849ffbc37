"""Shared fixtures: the tiny model every test loads through from_pretrained, built once per session."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jobs.tiny_model import main as build_tiny_model
from tests.helpers import BIN, free_port, stop_ray_head


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(out, seed=0, hidden=256, layers=2)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def head():
    """A real `ray start --head` with token auth, its token passed as RAY_AUTH_TOKEN so that no
    test reads or writes ~/.ray. Stopped through its own process group: `ray stop` would stop
    every Ray process on the machine."""
    token = secrets.token_hex(16)
    dashboard_port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rft", dir="/tmp")  # Ray needs a short socket path
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # submitted jobs resolve `python` here
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_worker_niceness": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # else SIGTERM waits 30 s on a stopping GCS
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    # Ready means a job is accepted: the dashboard answers before its job agent has registered,
    # and a submit in between fails with "No available agent to submit job".
    probe = urllib.request.Request(
        f"{address}/api/jobs/",
        data=json.dumps({"entrypoint": "true"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(probe, timeout=5)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                stop_ray_head(proc, temp_dir)
                pytest.fail(f"ray head at {address} accepted no job within 120 s")
            time.sleep(1)
    yield {"address": address, "env": env}
    stop_ray_head(proc, temp_dir)
