"""Secrets never land in a run's artifacts or logs: canary values planted in the environment
(cloud, tracker, hub and API keys) are searched for in everything a job and a data prep write,
the job's experiment tracker files included (wandb, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs.tracking import read_wandb_run
from tests.helpers import REPO

CANARIES = {
    "AWS_SECRET_ACCESS_KEY": "canary-aws-Zq81xP",
    "AWS_ACCESS_KEY_ID": "CANARYAKIA77QQ",
    "WANDB_API_KEY": "canary-wandb-Hh27vb",
    "HF_TOKEN": "hf_canaryTk93Lm",
    "OPENAI_API_KEY": "sk-canary-Pp45Rt",
}


@pytest.mark.integration
def test_no_secret_reaches_run_files_or_logs(tmp_path, tiny_model_dir):
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsec", dir="/tmp"))  # socket paths must stay short
    env = {
        **os.environ,
        **CANARIES,
        "RAY_TMPDIR": str(ray_tmp),
        "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
    }
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.finetune",
            "configs/quickstart.yaml",
            "run.name=canary",
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={tmp_path / 'runs'}",
            "train.max_steps=4",
            "eval.every_steps=2",
            "checkpoint.every_steps=2",
            "eval.max_generate_samples=4",
            "eval.early_stopping_patience=null",
            "tracking.backend=wandb",
            "tracking.mode=offline",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    prep = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.prepare",
            "tests/fixtures/messy/prepare.yaml",
            f"tokenizer={tiny_model_dir}",
            f"output={tmp_path / 'prepared'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]

    written = [
        p for root in ("runs", "prepared") for p in (tmp_path / root).rglob("*") if p.is_file()
    ]
    assert any(p.name == "run.json" for p in written) and any(
        p.name == "manifest.json" for p in written
    )
    # the tracker recorded the run (so its file below was worth searching): evals at steps 2 and
    # 4, the last step's train metrics, the final metrics and checkpoint locations, as run.json has them
    (tracker_dir,) = (tmp_path / "runs" / "canary" / "wandb").glob("offline-run-*")
    tracked = read_wandb_run(tracker_dir)
    manifest = json.loads((tmp_path / "runs" / "canary" / "run.json").read_text())
    evals = {h["_step"]: h["eval/loss"] for h in tracked["history"] if "eval/loss" in h}
    assert evals == pytest.approx({e["step"]: e["eval_loss"] for e in manifest["eval_history"]})
    assert [h["_step"] for h in tracked["history"] if "train/loss" in h] == [4]
    assert tracked["summary"]["final/eval_loss"] == pytest.approx(manifest["metrics"]["eval_loss"])
    assert tracked["summary"]["last_checkpoint"].endswith("canary/checkpoint_000004_final")
    assert tracked["config"]["provenance"]["dataset_hash"] == manifest["dataset_hash"]
    written += [p for p in (tmp_path / "wandb-config").rglob("*") if p.is_file()]
    logs = [
        p
        for p in ray_tmp.rglob("*")
        if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json")
    ]
    blobs = {str(p): p.read_bytes() for p in written + logs}
    blobs["job stdout+stderr"] = (job.stdout + job.stderr).encode()
    blobs["prepare stdout+stderr"] = (prep.stdout + prep.stderr).encode()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert len(logs) > 5  # Ray's own logs were searched too
    for name, value in CANARIES.items():
        leaks = [where for where, blob in blobs.items() if value.encode() in blob]
        assert not leaks, f"{name} leaked into {leaks}"
