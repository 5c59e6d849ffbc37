"""Experiment tracking: what a tracker logs is read back from the tracker's own store (MLflow's
file store through MlflowClient, an offline wandb run's .wandb file), resumed runs continue the
same tracker run, and a tracker that fails never fails the training run unless required."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.run_record import git_state
from jobs.tracking import (
    MlflowTracker,
    Tracker,
    TrackerStartError,
    WandbTracker,
    read_wandb_run,
    start_tracker,
    tracked_config,
    tracking_run_info,
    wandb_dir,
    wandb_run_id,
)
from tests.helpers import REPO, free_port


@pytest.fixture(autouse=True)
def offline_tracking(monkeypatch, tmp_path):
    """No test reaches a tracking service: wandb offline, its settings and cache in tmp."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    before = set(os.environ)
    yield
    for key in set(os.environ) - before:  # the MLflow defaults a tracker sets for its process
        del os.environ[key]


def job_config(storage, *overrides):
    return load_config(
        REPO / "configs" / "quickstart.yaml",
        [f"checkpoint.storage_path={storage}", "run.name=track", *overrides],
    )


def test_wandb_offline_run_is_read_back_and_a_rerun_continues_it(tmp_path):
    cfg = job_config(
        tmp_path / "runs",
        "tracking.backend=wandb",
        "tracking.mode=offline",
        "tracking.tags.team=nlp",
        f"tracking.tags.note={'x' * 40_000}",  # spans wandb's 32 KiB blocks
    )
    info = tracking_run_info(cfg, "sha256:feed")
    tracker = start_tracker(cfg, info, total_steps=30)
    assert isinstance(tracker, WandbTracker)
    for step in (10, 20):
        tracker.log({"train/loss": 3.0 / step, "train/lr": 1e-3, "train/tokens_per_s": 500.0}, step)
    tracker.log({"eval/loss": 0.4}, 20)
    tracker.log_checkpoint(f"{tmp_path}/runs/track/checkpoint_000020", 20)
    tracker.finish()
    # the same run.name again (a restart or a re-run): the same wandb run id
    again = start_tracker(cfg, tracking_run_info(cfg, "sha256:feed"), total_steps=30)
    again.log({"train/loss": 0.05}, 30)
    again.summary({"step": 30, "eval_loss": 0.3, "base_eval_loss": 9.1})
    again.finish()

    first, second = sorted((tmp_path / "runs" / "track" / "wandb").glob("offline-run-*"))
    run, rerun = read_wandb_run(first), read_wandb_run(second)
    assert run["run_id"] == rerun["run_id"] == wandb_run_id(info["run_key"], "track")
    assert run["project"] == "rayft"
    assert [(h["_step"], h.get("train/loss"), h.get("eval/loss")) for h in run["history"]] == [
        (10, 0.3, None),
        (20, 0.15, 0.4),
    ]
    assert run["history"][0]["train/tokens_per_s"] == 500.0
    assert [(h["_step"], h["train/loss"]) for h in rerun["history"]] == [(30, 0.05)]
    config = run["config"]
    assert config["lora"]["r"] == 16 and config["train"]["lr"] == 2e-3
    assert config["tracking"]["tags"]["note"] == "x" * 40_000
    provenance = config["provenance"]
    assert provenance["dataset_hash"] == "sha256:feed" and provenance["total_steps"] == 30
    assert provenance["code"]["sha"] == git_state()["sha"]
    assert provenance["libraries"]["torch"] and provenance["hardware"]["cpu_count"] >= 1
    assert {
        "lora_r=16",
        "lora_alpha=32.0",
        "lr=0.002",
        "steps=30",
        "strategy=ddp",
        "team=nlp",
        "dataset_hash=sha256:feed",
        f"git_sha={git_state()['sha']}",
    } <= set(run["tags"])
    assert "base_model=.cache/tiny-llama" in run["tags"]
    assert run["summary"]["last_checkpoint"].endswith("track/checkpoint_000020")
    assert run["summary"]["checkpoints"] == [
        {"step": 20, "path": f"{tmp_path}/runs/track/checkpoint_000020"}
    ]
    assert rerun["summary"]["final/eval_loss"] == 0.3
    assert rerun["summary"]["final/base_eval_loss"] == 9.1
    # a file cut at a block boundary inside the 40 KB run record (as wandb can leave it for a moment
    # after finish): the reader says so instead of returning a run with no id
    (whole,) = first.glob("*.wandb")
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(whole.read_bytes()[:32768])
    with pytest.raises(ValueError, match="ends inside a record"):
        read_wandb_run(torn)


def history(client, run_id: str, key: str) -> list:
    """A metric's points by step (asynchronous logging may store them out of order)."""
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def mlflow_status(store) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("rayft").experiment_id])
    return run.info.status


def test_a_run_that_raises_is_marked_failed_and_a_rerun_finishes_it(tmp_path):
    store = tmp_path / "mlruns"
    for backend in ("mlflow", "wandb"):
        cfg = job_config(
            tmp_path / "runs",
            f"tracking.backend={backend}",
            f"tracking.tracking_uri={store}",
            "tracking.mode=offline",
        )
        info = tracking_run_info(cfg, "sha256:feed")
        with (
            pytest.raises(RuntimeError, match="worker lost"),
            start_tracker(cfg, info, total_steps=30) as tracker,
        ):
            tracker.log({"train/loss": 0.3}, 10)
            raise RuntimeError("worker lost")
        if backend == "mlflow":
            assert mlflow_status(store) == "FAILED"
        with start_tracker(cfg, info, total_steps=30) as tracker:  # the restart
            tracker.log({"train/loss": 0.1}, 20)
    assert mlflow_status(store) == "FINISHED"
    failed, finished = sorted((tmp_path / "runs" / "track" / "wandb").glob("offline-run-*"))
    assert read_wandb_run(failed)["exit_code"] == 1 and read_wandb_run(finished)["exit_code"] == 0


def test_mlflow_run_is_read_back_and_a_rerun_continues_it(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    cfg = job_config(
        tmp_path / "runs",
        "tracking.backend=mlflow",
        f"tracking.tracking_uri={store}",
        "tracking.project=reviews",
        "tracking.tags.team=nlp",
    )
    info = tracking_run_info(cfg, "sha256:feed")
    tracker = start_tracker(cfg, info, total_steps=30)
    assert isinstance(tracker, MlflowTracker)
    tracker.log({"train/loss": 0.3, "train/lr": 1e-3, "train/tokens_per_s": 500.0}, 10)
    tracker.log({"train/loss": 0.15, "eval/loss": 0.4}, 20)
    tracker.log_checkpoint("runs/track/checkpoint_000020", 20)
    tracker.finish()
    again = start_tracker(cfg, tracking_run_info(cfg, "sha256:feed"), total_steps=30)
    again.log({"train/loss": 0.05}, 30)
    again.log_checkpoint("runs/track/checkpoint_000030_final", 30)
    again.summary({"step": 30, "eval_loss": 0.3, "exact_match": 1.0, "note": "text is skipped"})
    again.finish()

    client = MlflowClient(store.as_uri())
    experiment = client.get_experiment_by_name("reviews")
    (run,) = client.search_runs([experiment.experiment_id])  # one run, continued
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "track"
    loss = history(client, run_id, "train/loss")
    assert [(m.step, m.value) for m in loss] == [(10, 0.3), (20, 0.15), (30, 0.05)]
    assert [(m.step, m.value) for m in history(client, run_id, "eval/loss")] == [(20, 0.4)]
    assert client.get_metric_history(run_id, "train/tokens_per_s")[0].value == 500.0
    assert (
        run.data.metrics["final/eval_loss"] == 0.3 and run.data.metrics["final/exact_match"] == 1.0
    )
    assert "final/note" not in run.data.metrics
    tags = run.data.tags
    assert {k: tags[k] for k in ("lora_r", "lora_alpha", "lr", "steps", "strategy", "team")} == {
        "lora_r": "16",
        "lora_alpha": "32.0",
        "lr": "0.002",
        "steps": "30",
        "strategy": "ddp",
        "team": "nlp",
    }
    assert tags["dataset_hash"] == "sha256:feed" and tags["git_sha"] == git_state()["sha"]
    assert tags["method"] == "lora" and tags["objective"] == "sft"
    assert tags["mlflow.source.git.commit"] == git_state()["sha"]
    assert tags["base_model"] == ".cache/tiny-llama" and tags["rayft.run_key"] == info["run_key"]
    assert tags["rayft.checkpoint.000020"] == "runs/track/checkpoint_000020"
    assert tags["rayft.last_checkpoint"] == "runs/track/checkpoint_000030_final"
    params = run.data.params
    assert params["lora.r"] == "16" and params["train.lr"] == "0.002"
    assert params["provenance.dataset_hash"] == "sha256:feed"
    assert params["lora.target_modules"] == "all-linear" and params["lora.dropout"] == "0.05"
    artifact = client.download_artifacts(run_id, "config.json", str(tmp_path / "dl"))
    config = json.loads(Path(artifact).read_text())
    assert config["lora"]["alpha"] == 32 and config["provenance"]["code"] == git_state()


def test_a_tracker_that_cannot_start_warns_once_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the product default retries twice
    port = free_port()  # nothing listens there
    uri = f"http://admin:hunter2-secret@127.0.0.1:{port}"
    cfg = job_config(tmp_path, "tracking.backend=mlflow", f"tracking.tracking_uri={uri}")
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        tracker = start_tracker(cfg, tracking_run_info(cfg, "sha256:feed"), total_steps=3)
    assert type(tracker) is Tracker  # no-op: training goes on
    tracker.log({"train/loss": 1.0}, 1)
    tracker.finish()
    (warning,) = [r for r in caplog.records if r.name == "jobs.tracking"]
    assert "tracking.backend mlflow did not start" in warning.getMessage()
    assert "hunter2-secret" not in caplog.text

    required = job_config(
        tmp_path,
        "tracking.backend=mlflow",
        f"tracking.tracking_uri={uri}",
        "tracking.required=true",
    )
    with pytest.raises(TrackerStartError, match="tracking.required") as error:
        start_tracker(required, tracking_run_info(required, "sha256:feed"), total_steps=3)
    assert "hunter2-secret" not in str(error.value)


def test_wandb_that_cannot_write_its_directory_warns(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("WANDB_DIR", str(blocker / "wandb"))  # a directory under a file
    cfg = job_config(tmp_path, "tracking.backend=wandb", "tracking.mode=offline")
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        tracker = start_tracker(cfg, tracking_run_info(cfg, "sha256:feed"), total_steps=3)
    assert type(tracker) is Tracker
    assert "tracking.backend wandb did not start" in caplog.text


def test_a_tracker_failing_mid_run_warns_once_then_stays_quiet(tmp_path, caplog):
    store = tmp_path / "mlruns"
    cfg = job_config(tmp_path, "tracking.backend=mlflow", f"tracking.tracking_uri={store}")
    tracker = start_tracker(cfg, tracking_run_info(cfg, "sha256:feed"), total_steps=3)
    tracker.log({"train/loss": 1.0}, 1)
    shutil.rmtree(store)  # the store vanishes under a running job
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        tracker.log_checkpoint("runs/x/checkpoint_000002", 2)
        tracker.log({"train/loss": 0.5}, 3)
        tracker.summary({"step": 3, "eval_loss": 0.4})
        tracker.finish()
    (warning,) = [r for r in caplog.records if r.name == "jobs.tracking"]
    assert "failed in log_checkpoint" in warning.getMessage()


def test_backend_none_and_ranks_other_than_0_track_nothing(tmp_path, monkeypatch):
    cfg = job_config(tmp_path)
    assert type(start_tracker(cfg, tracking_run_info(cfg, "sha256:feed"), 3)) is Tracker
    wandb = job_config(tmp_path, "tracking.backend=wandb", "tracking.mode=offline")
    monkeypatch.setattr("inference.runtime.rank_and_world", lambda: (1, 2))  # a second DDP rank
    assert type(start_tracker(wandb, tracking_run_info(wandb, "sha256:feed"), 3)) is Tracker
    assert not (tmp_path / "track").exists()  # no wandb directory either


def test_the_run_key_is_the_checkpoint_directory(tmp_path):
    a = tracking_run_info(job_config(tmp_path / "one"), "sha256:x")
    assert a["run_key"] == tracking_run_info(job_config(tmp_path / "one"), "sha256:y")["run_key"]
    assert a["run_key"] != tracking_run_info(job_config(tmp_path / "two"), "sha256:x")["run_key"]
    run_id = wandb_run_id(a["run_key"], "my.run_name")
    assert run_id.startswith("my-run_name-") and len(run_id) <= 64


def test_wandb_files_go_beside_a_local_run_else_to_the_home_cache(tmp_path, monkeypatch):
    local = tracking_run_info(job_config(tmp_path / "runs"), "sha256:x")
    assert wandb_dir(local) == f"{tmp_path}/runs/track"
    remote = tracking_run_info(job_config("s3://bucket/runs"), "sha256:x")
    assert remote["run_dir"] == "s3://bucket/runs/track"
    assert wandb_dir(remote) == str(Path.home() / ".cache" / "rayft" / "wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    assert wandb_dir(local) == wandb_dir(remote) == str(tmp_path / "mine")


def test_the_tracked_config_hides_secrets(tmp_path, monkeypatch):
    cfg = job_config(
        tmp_path,
        "tracking.backend=mlflow",
        "tracking.tracking_uri=https://bob:pa55word-xyz@mlflow.example.com",
        "tracking.tags.api_key=sk-live-abc123",
    )
    text = json.dumps(tracked_config(cfg, tracking_run_info(cfg, "sha256:x"), 3))
    assert "pa55word-xyz" not in text and "sk-live-abc123" not in text
    assert "https://***@mlflow.example.com" in text


@pytest.mark.integration  # wandb starts its service process
@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_tracker_files_hold_no_secret(backend, tmp_path, monkeypatch):
    """Canaries in the environment (as on a real node) and a secret-looking tag in the config:
    none reaches the tracker's files."""
    from tests.test_secrets import CANARIES

    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    store = tmp_path / "store"
    cfg = job_config(
        tmp_path / "runs",
        f"tracking.backend={backend}",
        "tracking.mode=offline",
        f"tracking.tracking_uri={store}",
        "tracking.tags.hf_token=hf_canary-in-config-Qq12",
    )
    tracker = start_tracker(cfg, tracking_run_info(cfg, "sha256:feed"), total_steps=2)
    assert type(tracker) is not Tracker
    tracker.log({"train/loss": 1.0}, 1)
    tracker.summary({"step": 2, "eval_loss": 0.5})
    tracker.finish()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 3
    blobs = b"\n".join(p.read_bytes() for p in files)
    assert b"0.5" in blobs  # what was logged is there...
    for value in [*CANARIES.values(), "hf_canary-in-config-Qq12"]:
        assert value.encode() not in blobs, value  # ...and no secret


# ------------------------------------------------------------------------ on Ray Train workers


@pytest.mark.integration
def test_a_job_tracked_with_mlflow_logs_steps_evals_checkpoints_and_final_metrics(
    ray_local, tiny_model_dir, tmp_path, monkeypatch
):
    """Through the real job: per-step and eval metrics from rank 0 at the log interval, across a
    pause and a resume into the same MLflow run; checkpoint locations; the final evaluation."""
    from mlflow.tracking import MlflowClient

    from jobs.finetune import run_job

    store = tmp_path / "mlruns"
    common = [
        f"model.name_or_path={tiny_model_dir}",
        "train.max_steps=6",
        "train.log_every_steps=2",
        "eval.every_steps=3",
        "checkpoint.every_steps=3",
        "eval.max_generate_samples=4",
        "eval.early_stopping_patience=null",
        "tracking.backend=mlflow",
        f"tracking.tracking_uri={store}",
        "scaling.local=true",  # in this process: no worker to start
    ]
    first = run_job(job_config(tmp_path / "runs", "run.stop_after_steps=3", *common))
    assert first["status"] == "paused at step 3"
    summary = run_job(job_config(tmp_path / "runs", *common))  # resumes from step 3
    assert summary["resumed_at_steps"] == [3]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process only reads the store
    client = MlflowClient(store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("rayft").experiment_id])
    loss = history(client, run.info.run_id, "train/loss")
    expected = {h["step"]: h["loss"] for h in summary["loss_history"]}
    assert [m.step for m in loss] == [2, 4, 6]  # log_every_steps, across the restart
    assert [m.value for m in loss] == pytest.approx([expected[s] for s in (2, 4, 6)], rel=1e-6)
    evals = history(client, run.info.run_id, "eval/loss")
    assert [m.step for m in evals] == [e["step"] for e in summary["eval_history"]] == [3, 6]
    assert [m.value for m in evals] == pytest.approx(
        [e["eval_loss"] for e in summary["eval_history"]], rel=1e-6
    )
    metrics = run.data.metrics
    assert metrics["final/eval_loss"] == pytest.approx(summary["metrics"]["eval_loss"], rel=1e-6)
    assert metrics["final/base_eval_loss"] == pytest.approx(
        summary["metrics"]["base_eval_loss"], rel=1e-6
    )
    tags = run.data.tags
    run_dir = tmp_path / "runs" / "track"
    assert tags["rayft.checkpoint.000003"] == f"{run_dir}/checkpoint_000003"
    assert tags["rayft.last_checkpoint"] == f"{run_dir}/checkpoint_000006_final"
    assert tags["dataset_hash"] == summary["dataset_hash"] and tags["steps"] == "6"
    assert run.data.params["lora.r"] == "16" and run.info.status == "FINISHED"
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["hardware"]["ray_cluster"]["nodes"][0]["cpus"] == 2  # this test's Ray
    assert manifest["hardware"]["driver"]["cpu_count"] >= 1
