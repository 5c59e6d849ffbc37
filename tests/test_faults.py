"""Faults a spot cluster meets, caused for real: a worker SIGTERMed (the node's shutdown) and
SIGKILLed, object storage unreachable mid-run, a driver killed and the job resubmitted, a torn
checkpoint. The goal in each: nothing lost but the steps since the last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import psutil
import pyarrow.fs
import pytest
import ray
import torch
from ray.util.state import list_actors
from safetensors.torch import load_file

from core.ray_cluster import start_local_ray
from jobs.checkpointing import (
    checkpoint_dir_name,
    checkpoint_step,
    newest_complete_checkpoint,
    torn_reason,
    write_commit_marker,
)
from jobs.config import load_config
from jobs.durable import upload_with_retry
from jobs.finetune import run_job
from tests.helpers import REPO, TcpProxy, wait_for

QUIET = ["eval.every_steps=null", "eval.early_stopping_patience=null", "eval.task_metric=none"]


def job(tiny_model_dir, storage, *overrides):
    return load_config(
        "configs/quickstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={storage}",
            *QUIET,
            *overrides,
        ],
    )


def registered_steps(snapshot_text: str | None) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (all ranks reported)."""
    if not snapshot_text:
        return []
    results = json.loads(snapshot_text).get("checkpoint_results", [])
    return sorted(checkpoint_step(r["checkpoint_dir_name"]) for r in results)


def train_workers() -> list[int]:
    actors = list_actors(
        address=f"http://{ray._private.worker.get_dashboard_url()}",  # others may run Ray here
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        detail=True,
    )
    return sorted(a.pid for a in actors)


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def in_background(cfg) -> tuple[threading.Thread, dict]:
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(run_job(cfg)), daemon=True)
    runner.start()
    return runner, outcome


# ------------------------------------------------------------------ no Ray: the pieces


def test_commit_markers_tell_complete_from_torn(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    for step in (10, 20):
        ckpt = tmp_path / f"checkpoint_{step:06d}"
        for rank in range(2):
            (ckpt / "adapter").mkdir(parents=True, exist_ok=True)
            (ckpt / f"rng_rank{rank}.pt").write_bytes(b"x" * (10 + rank))
            if rank == 0:
                (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 100)
        # two ranks wrote into one directory: each lists its own files
        write_commit_marker(ckpt, 0, 2, step)
        (ckpt / "COMMIT_rank0_of2.json").rename(tmp_path / "m0")
        write_commit_marker(ckpt, 1, 2, step)
        (tmp_path / "m0").rename(ckpt / "COMMIT_rank0_of2.json")
        assert torn_reason(fs, str(ckpt)) is None
    newest = tmp_path / "checkpoint_000020"

    (newest / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 40)  # cut off
    assert "adapter/adapter_model.safetensors: 40 bytes" in torn_reason(fs, str(newest))
    (newest / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (newest / "COMMIT_rank1_of2.json").unlink()  # rank 1's upload never finished
    assert torn_reason(fs, str(newest)) == "no commit marker from rank(s) [1] of 2"

    path, skipped = newest_complete_checkpoint(fs, str(tmp_path))
    assert path == str(tmp_path / "checkpoint_000010")
    assert skipped == [
        {"checkpoint": "checkpoint_000020", "reason": "no commit marker from rank(s) [1] of 2"}
    ]


def test_a_resume_past_a_torn_checkpoint_writes_beside_it(tmp_path):
    """Ray may have registered a checkpoint that was torn later: writing the same step again
    into its directory would give Ray two entries for one path (keep_last then deletes it twice
    and the Train controller fails), so the new one goes beside it and wins when resuming."""
    torn = {"checkpoint_000020", "checkpoint_000020_retry1", "checkpoint_000040_final"}
    assert checkpoint_dir_name(10, False, torn) == "checkpoint_000010"
    assert checkpoint_dir_name(20, False, torn) == "checkpoint_000020_retry2"
    assert checkpoint_dir_name(40, True, torn) == "checkpoint_000040_final_retry1"
    assert checkpoint_step("checkpoint_000040_final_retry1") == 40

    fs = pyarrow.fs.LocalFileSystem()
    for name in ("checkpoint_000020", "checkpoint_000020_retry1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
        write_commit_marker(tmp_path / name, 0, 1, 20)
    path, skipped = newest_complete_checkpoint(fs, str(tmp_path))
    assert path == str(tmp_path / "checkpoint_000020_retry1") and skipped == []


@pytest.fixture
def s3_via_proxy(s3_server):
    """moto's S3 behind a relay that can be switched off; AWS_ENDPOINT_URL points at the relay."""
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]))
    endpoint = f"http://127.0.0.1:{proxy.port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield proxy, endpoint
    os.environ["AWS_ENDPOINT_URL"] = s3_server


def s3fs_for(endpoint: str, **options) -> pyarrow.fs.S3FileSystem:
    return pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", **options)


@pytest.mark.integration
def test_upload_waits_out_an_outage_and_gives_up_after_the_bound(s3_via_proxy, tmp_path):
    proxy, endpoint = s3_via_proxy
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
    # No retries inside the AWS SDK: on a loaded machine its own backoff outlasted the outage (seen
    # in CI: 5 refused, no retry of ours); every refused request must reach upload_with_retry.
    fs = s3fs_for(endpoint, retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1))
    local = tmp_path / "checkpoint_000005"
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(50_000))
    write_commit_marker(local, 0, 1, 5)

    proxy.down()
    threading.Timer(4, proxy.up).start()
    log: list[str] = []
    upload_with_retry(local, fs, "outage/run/checkpoint_000005", retry_s=60, log=log.append)
    assert proxy.refused > 0 and any("retrying" in line for line in log)
    assert torn_reason(fs, "outage/run/checkpoint_000005") is None

    proxy.down()
    with pytest.raises(
        RuntimeError,
        match=r"checkpoint outage/run/checkpoint_000006: upload "
        r"failed for 2 s \(checkpoint.upload_retry_s\)",
    ):
        upload_with_retry(local, fs, "outage/run/checkpoint_000006", retry_s=2, log=log.append)
    proxy.up()
    assert torn_reason(fs, "outage/run/checkpoint_000006") is not None  # never called saved


# ------------------------------------------------------------------ real runs on Ray


@pytest.mark.integration
@pytest.mark.slow
def test_training_goes_on_while_storage_is_down(s3_via_proxy, tiny_model_dir):
    proxy, endpoint = s3_via_proxy
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="flaky")
    ray.shutdown()  # the session's Ray: this test needs one whose workers see the relay
    start_local_ray(num_cpus=2)  # after AWS_ENDPOINT_URL points at the relay: workers inherit it
    try:
        cfg = job(
            tiny_model_dir,
            "s3://flaky/runs",
            "run.name=outage",
            "train.max_steps=120",
            "checkpoint.every_steps=10",
            "checkpoint.keep_last=20",
            "checkpoint.upload_retry_s=120",
        )
        runner, outcome = in_background(cfg)
        fs = s3fs_for(endpoint)

        def snapshot():
            try:
                with fs.open_input_stream(
                    "flaky/runs/outage/checkpoint_manager_snapshot.json"
                ) as f:
                    return f.read().decode()
            except OSError:
                return None

        wait_for(
            lambda: registered_steps(snapshot()), 240, "a first checkpoint", 0.1, runner.is_alive
        )
        proxy.down()
        # down until an upload meets the outage, however slowly this machine reaches the next
        # checkpoint (a fixed outage could fall between two uploads on a busy machine)
        wait_for(
            lambda: proxy.refused > 0, 300, "an upload to meet the outage", 0.1, runner.is_alive
        )
        proxy.up()
        runner.join(timeout=300)
    finally:
        ray.shutdown()

    summary = outcome
    assert proxy.refused > 0  # uploads met the outage
    assert summary["status"] == "completed" and summary["resumed_at_steps"] == []
    assert [h["step"] for h in summary["loss_history"]] == list(range(1, 121))
    steps = registered_steps(snapshot())
    assert steps == list(range(10, 121, 10))  # every checkpoint made it, none twice
    for step in steps:
        name = f"checkpoint_{step:06d}" + ("_final" if step == 120 else "")
        path = f"flaky/runs/outage/{name}"
        assert torn_reason(fs, path) is None, name
        with fs.open_input_stream(f"{path}/adapter/adapter_model.safetensors") as f:
            from safetensors.torch import load

            assert len(load(f.read())) == 28


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_then_sigkill_lose_nothing_but_steps_since_the_last_checkpoint(
    ray_local, tiny_model_dir, tmp_path
):
    common = [
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
        "train.micro_batch_size=8",
        "train.max_steps=50",
        "checkpoint.every_steps=10",
        "checkpoint.keep_last=2",
        "scaling.max_failures=3",
    ]
    reference = run_job(job(tiny_model_dir, tmp_path, "run.name=calm", *common))

    runner, outcome = in_background(job(tiny_model_dir, tmp_path, "run.name=chaos", *common))
    snapshot = tmp_path / "chaos" / "checkpoint_manager_snapshot.json"
    read = lambda: registered_steps(snapshot.read_text() if snapshot.is_file() else None)  # noqa: E731
    wait_for(
        lambda: read() and len(train_workers()) == 2,
        240,
        "a first checkpoint",
        0.1,
        runner.is_alive,
    )
    seen_at_sigterm = max(read())
    first_group = train_workers()
    os.kill(first_group[-1], signal.SIGTERM)  # the node's shutdown reaches one worker

    # the group restarts from the SIGTERM checkpoint; after its next regular one, SIGKILL
    wait_for(
        lambda: set(train_workers()).isdisjoint(first_group) and len(train_workers()) == 2,
        240,
        "the restarted worker group",
        0.1,
        runner.is_alive,
    )
    after_restart = max(read())
    wait_for(
        lambda: max(read()) > after_restart and max(read()) % 10 == 0,
        240,
        "a new checkpoint",
        0.1,
        runner.is_alive,
    )
    os.kill(train_workers()[0], signal.SIGKILL)
    runner.join(timeout=300)

    summary = outcome
    assert summary["status"] == "completed"
    preempted_at, killed_at = summary["resumed_at_steps"]
    assert preempted_at > seen_at_sigterm  # saved on SIGTERM, not only at the last regular one
    assert killed_at % 10 == 0 and killed_at > preempted_at
    assert [h["step"] for h in summary["loss_history"]] == list(range(1, 51))  # no gap or repeat
    got = [h["loss"] for h in summary["loss_history"]]
    assert got == pytest.approx([h["loss"] for h in reference["loss_history"]], rel=1e-4)
    ours = load_file(Path(summary["adapter"]) / "adapter_model.safetensors")
    calm = load_file(Path(reference["adapter"]) / "adapter_model.safetensors")
    assert ours.keys() == calm.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], calm[name], atol=1e-4, rtol=0)


@pytest.mark.integration
@pytest.mark.slow
def test_driver_killed_then_resubmitted_resumes_past_a_torn_checkpoint(
    ray_local, tiny_model_dir, tmp_path
):
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"checkpoint.storage_path={tmp_path}",
        "run.name=laptop",
        "train.max_steps=40",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=5",
        *QUIET,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.finetune", "configs/quickstart.yaml", *overrides],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    snapshot = tmp_path / "laptop" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while len(registered_steps(snapshot.read_text() if snapshot.is_file() else None)) < 2:
        assert driver.poll() is None and time.time() < deadline, "no checkpoints before the kill"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # the laptop's driver and its embedded Ray, gone
    driver.wait()
    # Ray's worker processes have process groups of their own: they notice the lost raylet
    # and exit within seconds, the Train controller still registering and deleting meanwhile
    while any(session_of(p) == driver.pid for p in psutil.pids()):
        assert time.time() < deadline + 60, "the killed driver's Ray processes live on"
        time.sleep(0.2)
    *older, newest = sorted((tmp_path / "laptop").glob("checkpoint_0*"))  # registered or not
    assert checkpoint_step(newest.name) < 40
    # one worker: a checkpoint whose marker (uploaded last) is there is complete
    expected = max(
        checkpoint_step(c.name) for c in older if (c / "COMMIT_rank0_of1.json").is_file()
    )

    # the newest checkpoint as an upload cut off mid-way leaves it: a file short, no marker
    weights = newest / "adapter" / "adapter_model.safetensors"
    if weights.is_file():
        weights.write_bytes(weights.read_bytes()[:1000])
    (newest / "COMMIT_rank0_of1.json").unlink(missing_ok=True)

    summary = run_job(load_config("configs/quickstart.yaml", overrides))  # resubmitted
    assert summary["status"] == "completed"
    assert summary["skipped_checkpoints"] == [
        {
            "checkpoint": newest.name,
            "reason": "no commit marker (written last: the upload did not finish)",
        }
    ]
    assert summary["resumed_at_steps"] == [expected]
    assert [h["step"] for h in summary["loss_history"]] == list(range(1, 41))
