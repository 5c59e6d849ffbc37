"""Shared fixtures, and the tiers.

Tiers: a test that starts Ray, a server, vLLM or a subprocess is `integration` (or `slow`, a long
multi-process run). A test that asks for one of the process fixtures below is marked integration
here, at collection; any other test that starts a process without the mark fails with a message
saying so, so `make test-fast` (unit tests only) cannot start one by mistake.

The expensive things are built once per session and shared: the tiny model, the local Ray, the
Ray head, the trained tools adapter.
"""

from __future__ import annotations

import functools
import json
import multiprocessing.process
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jobs.tiny_model import main as build_tiny_model
from tests.helpers import (
    BIN,
    REPO,
    free_port,
    local_ray,
    start_ray_head,
    stop_ray_head,
    wait_for_port,
)

# Ray workers, Serve replicas and the subprocesses tests start import this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
# Ray Train's controller polls its workers every 2 s by default: every run waits out a few polls
# to start and one to end. Measured on a 2-step job here: 23 s at 2 s, 18 s at 0.1 s. A missed
# poll is not a failure (the controller waits 10 min before calling a worker dead), so the short
# interval only makes the tests' many small runs end sooner. Set before any Ray starts: the
# session's Ray, the heads and the subprocess jobs inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Ray Train starts a preemption watcher actor per run, a process of its own that only logs node
# drains; the job saves on SIGTERM itself (jobs/checkpointing.py) and no test reads those logs.
# Off, each run starts one process fewer (~1 CPU-second of imports; 3 two-step runs took 72 and 94
# machine CPU-seconds without it, 79 and 95 with it: within the noise of one measurement).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Fixtures that start processes or servers: a test using one (directly or through another
# fixture) is an integration test.
PROCESS_FIXTURES = {"ray_local", "head", "s3_server", "tools_adapter"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)


class StartsAProcess(RuntimeError):
    pass


# The test being set up, run or torn down, when it is a unit test (no integration, slow or gpu
# mark); None otherwise. Set before its fixtures, so a module fixture that starts a server for
# a unit test is caught too.
_unit_test: list[str | None] = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    marked = any(item.get_closest_marker(m) for m in ("integration", "slow", "gpu"))
    _unit_test[0] = None if marked else item.nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _unit_test[0] = None


def _refuse_in_a_unit_test(what: str) -> None:
    if _unit_test[0] is not None and threading.current_thread() is threading.main_thread():
        raise StartsAProcess(
            f"{_unit_test[0]} {what}: mark it @pytest.mark.integration (tests/README.md, the tiers)"
        )


def _refused_in_unit_tests(original, what: str):
    @functools.wraps(original)
    def guarded(*args, **kwargs):
        _refuse_in_a_unit_test(what)
        return original(*args, **kwargs)

    return guarded


# A subprocess job is a Python interpreter or one of Ray's or the servers' commands; a short tool
# (git, file, wandb's writer) is not.
JOB_COMMANDS = ("python", "ray", "moto_server", "vllm", "serve", "uvicorn")
_execute_child = subprocess.Popen._execute_child


def _guarded_execute_child(self, args, executable, *rest, **kwargs):
    argv = [args] if isinstance(args, (str, bytes)) else list(args)
    program = Path(os.fsdecode(executable or argv[0]).split()[0]).name
    if program.startswith(JOB_COMMANDS):
        _refuse_in_a_unit_test(f"starts a subprocess job ({program})")
    return _execute_child(self, args, executable, *rest, **kwargs)


subprocess.Popen._execute_child = _guarded_execute_child
multiprocessing.process.BaseProcess.start = _refused_in_unit_tests(
    multiprocessing.process.BaseProcess.start, "starts a process"
)
socket.socket.listen = _refused_in_unit_tests(socket.socket.listen, "starts a server")
os.fork = _refused_in_unit_tests(os.fork, "forks")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, as a Serve replica with num_cpus=1 has: two threads on two
    busy cores spin against other processes (engine tests ran 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    """configs/tools.yaml trained once for the session, at a quarter of its steps (~40 s on 2 CPUs): the tool-calling
    adapter that tests/test_data_tools.py scores offline and tests/test_serve_vllm.py
    serves. Only tests marked slow ask for it."""

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
            # A quarter of the shipped config's steps (about 400): the calls' format and tools
            # are learned, the arguments partly (held out: 0.10 at 300 steps, 0.19 at 800, 0.38
            # at the full 1,600; the untrained model gets none right).
            "train.epochs=8",
            "scaling.local=true",  # in this process: 38 s instead of 52 s here, quiet machine
        ],
    )
    local_ray()
    run_job(cfg)
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
    # generous: on 2 busy CPUs the job agent has taken over 2 min to accept a job
    deadline = time.time() + 400
    while True:
        try:
            urllib.request.urlopen(probe, timeout=30)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                stop_ray_head(proc, temp_dir)
                pytest.fail(f"ray head at {address} accepted no job within 400 s")
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
    """The session's local Ray (2 CPUs), shared by every module that needs one (helpers.local_ray)."""
    local_ray()
    yield


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
