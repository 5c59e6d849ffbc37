"""Shared fixtures: the tiny model every test loads through from_pretrained, built once per session."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jobs.tiny_model import main as build_tiny_model
from tests.helpers import BIN, free_port, start_ray_head, stop_ray_head, wait_for_port


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(out, seed=0, hidden=256, layers=2)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tools_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """configs/tools.yaml trained once for the session, at half its steps (~2 min on 2 CPUs): the tool-calling
    adapter that tests/test_data_tools.py scores offline and tests/test_serve_vllm_tools.py
    serves. Only tests marked slow ask for it."""
    import ray

    from core.ray_cluster import start_local_ray
    from jobs.config import load_config
    from jobs.finetune import run_job

    out = tmp_path_factory.mktemp("tools-run")
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs/tools.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={out}",
            "checkpoint.every_steps=null",
            "tracking.backend=none",
            # Half the shipped config's steps (about 800): the calls' format and tools are
            # learned, the arguments partly (0.19 held out, vs 0.38 at the full 1,600).
            "train.epochs=16",
        ],
    )
    start_local_ray(num_cpus=2)
    try:
        run_job(cfg)
    finally:
        ray.shutdown()
    return out / "tools/adapter"


@pytest.fixture(scope="session")
def head():
    """A real `ray start --head` with token auth, its token passed as RAY_AUTH_TOKEN so that no
    test reads or writes ~/.ray. Stopped through its own process group: `ray stop` would stop
    every Ray process on the machine."""
    token = secrets.token_hex(16)
    dashboard_port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    proc, temp_dir, env = start_ray_head(
        "--num-cpus=2", port=free_port(), dashboard_port=dashboard_port, env=auth
    )
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


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on loopback; credentials are throwaway test values."""
    port = free_port()
    moto = BIN / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_port(port)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray (2 CPUs) for a module's Ray Train runs."""
    import ray

    from core.ray_cluster import start_local_ray

    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()
