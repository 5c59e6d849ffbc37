"""A job whose storage is s3:// on a real S3-compatible server (moto's, on 127.0.0.1).

Checkpoints go to the bucket through Ray Train, the adapter, data report and run.json are
uploaded after training (run.json last), and re-running the run name resumes from the bucket.
"""

from __future__ import annotations

import json

import boto3
import pytest
import ray
import s3fs
from safetensors.torch import load

from jobs.config import ConfigError, load_config
from jobs.distributed import start_local_ray
from jobs.finetune import run_job

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_local():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_s3_storage_checkpoints_uploads_and_resumes(s3_server, ray_local, tiny_model_dir):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="ckpt")
    overrides = [
        f"model.name_or_path={tiny_model_dir}", "checkpoint.storage_path=s3://ckpt/runs",
        "run.name=remote", "train.max_steps=6", "eval.every_steps=null",
        "eval.early_stopping_patience=null", "eval.task_metric=none", "checkpoint.every_steps=null",
    ]  # fmt: skip
    first = run_job(load_config("configs/quickstart.yaml", [*overrides, "run.stop_after_steps=3"]))
    assert first["status"] == "paused at step 3"
    resumed = run_job(load_config("configs/quickstart.yaml", overrides))

    assert resumed["status"] == "completed" and resumed["resumed_at_steps"] == [3]
    assert [h["step"] for h in resumed["loss_history"]] == list(range(1, 7))
    assert resumed["adapter"] == "s3://ckpt/runs/remote/adapter"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    names = {p.removeprefix("ckpt/runs/remote/") for p in fs.find("ckpt/runs/remote")}
    assert {"run.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "data/manifest.json"} <= names  # fmt: skip
    assert any(n.startswith("checkpoint_000003/") for n in names)
    assert any(n.startswith("checkpoint_000006_final/") for n in names)
    manifest = json.loads(fs.cat("ckpt/runs/remote/run.json"))
    assert manifest["status"] == "completed" and manifest["steps"] == 6
    assert len(load(fs.cat("ckpt/runs/remote/adapter/adapter_model.safetensors"))) == 28


def test_storage_path_must_be_local_or_s3(tiny_model_dir):
    with pytest.raises(ConfigError, match="checkpoint.storage_path: gs://b/p: give a local"):
        load_config("configs/quickstart.yaml", [f"model.name_or_path={tiny_model_dir}",
                                                "checkpoint.storage_path=gs://b/p"])  # fmt: skip
