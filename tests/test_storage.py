"""core/storage.py function by function, on a local directory and on s3:// (moto's S3 server on
127.0.0.1); and a job whose storage is s3://: checkpoints go to the bucket through Ray Train, the
adapter, data report and run.json are uploaded after training (run.json last), and re-running the
run name resumes from the bucket.
"""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import boto3
import pyarrow.fs
import pytest
import s3fs
from safetensors.torch import load

from core import storage
from core.config import ConfigError
from jobs.config import load_config
from jobs.finetune import run_job

# a run directory as the recipe leaves it: what put_dir, get_dir and the copies move
TREE = {
    "run.json": '{"status": "completed"}',
    "adapter/adapter_config.json": '{"r": 8}',
    "adapter/weights/part-0.bin": "weights",
    "checkpoint_000001/state.pt": "state",
}


def write_tree(root: Path) -> Path:
    for rel, text in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def files_under(local: Path) -> dict[str, str]:
    return {p.relative_to(local).as_posix(): p.read_text() for p in local.rglob("*") if p.is_file()}


def new_bucket(endpoint: str) -> str:
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path) -> str:
    """An empty place to write to: a local directory, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "store" / "runs")
    return f"s3://{new_bucket(request.getfixturevalue('s3_server'))}/runs"


# ---------------------------------------------------------------- names and settings


def test_is_remote_and_unsupported_tell_schemes_apart():
    assert not storage.is_remote("runs/quickstart") and not storage.is_remote("/abs/runs")
    assert storage.is_remote("s3://bucket/runs") and storage.is_remote("gs://bucket/runs")
    assert storage.unsupported("gs://bucket/runs") and storage.unsupported("hdfs://nn/runs")
    assert not storage.unsupported("s3://bucket/runs")
    assert not storage.unsupported("file:///tmp/runs") and not storage.unsupported("runs")


def test_protocol_is_what_a_listed_key_needs_back_in_front():
    assert storage.protocol("s3://bucket/runs/a") == "s3://"
    assert storage.protocol("gs://bucket/a") == "gs://"
    assert storage.protocol("runs/a") == "" and storage.protocol("/abs/a") == ""


def test_join_never_doubles_a_slash_and_skips_empty_parts():
    assert storage.join("s3://bucket/runs/", "/a/", "run.json") == "s3://bucket/runs/a/run.json"
    assert storage.join("runs", "a", "", "run.json") == "runs/a/run.json"
    assert storage.join("/abs/runs/") == "/abs/runs"


def test_s3_goes_to_the_endpoint_from_the_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert storage.s3_endpoint() is None and storage.storage_options("s3://b/k") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert storage.storage_options("s3://b/k") == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}
    }
    assert storage.storage_options("runs/a") == {}  # local paths take no S3 options
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")  # the S3-only one wins
    assert storage.s3_endpoint() == "http://127.0.0.1:9001"


def test_ray_storage_is_a_path_and_the_filesystem_ray_train_needs(monkeypatch):
    assert storage.ray_storage("runs") == ("runs", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    path, fs = storage.ray_storage("s3://bucket/runs")
    assert path == "bucket/runs" and isinstance(fs, pyarrow.fs.PyFileSystem)
    # Ray pickles it to its controller: the copy is the patient S3 filesystem again
    copy = pickle.loads(pickle.dumps(fs))
    assert copy.handler == fs.handler and copy.handler.endpoint == "http://127.0.0.1:9000"
    assert isinstance(copy.handler.fs, pyarrow.fs.S3FileSystem)


# ---------------------------------------------------------------- files, locally and on s3://


def test_write_read_exists_and_list_files(store):
    note = storage.join(store, "a", "b", "note.txt")
    assert not storage.exists(note) and storage.list_files(store) == []
    storage.write_text(note, "héllo")  # local parent directories are made
    storage.write_text(storage.join(store, "a", "c.txt"), "c")
    assert storage.exists(note) and storage.read_text(note) == "héllo"
    with storage.open_url(note) as f:
        assert f.read() == "héllo".encode()
    fs, path = storage.filesystem(note)
    assert fs.cat_file(path) == "héllo".encode()
    assert storage.list_files(storage.join(store, "a")) == ["b/note.txt", "c.txt"]
    assert storage.list_files(storage.join(store, "absent")) == []


def test_put_dir_then_get_dir_gives_the_same_files(store, tmp_path):
    run = storage.join(store, "run")
    storage.put_dir(write_tree(tmp_path / "src"), run)
    assert storage.list_files(run) == sorted(TREE)
    assert files_under(storage.get_dir(run, tmp_path / "back")) == TREE
    # only the top-level entries named: a run directory read without its checkpoints
    some = storage.get_dir(run, tmp_path / "some", parts=("run.json", "adapter"))
    assert files_under(some) == {k: v for k, v in TREE.items() if not k.startswith("checkpoint")}
    storage.get_file(storage.join(run, "adapter/adapter_config.json"), tmp_path / "one" / "c.json")
    assert (tmp_path / "one" / "c.json").read_text() == TREE["adapter/adapter_config.json"]


def test_a_local_copy_of_a_local_directory_is_the_directory_itself(tmp_path):
    src = write_tree(tmp_path / "run")
    with storage.local_copy(str(src), parts=("adapter",)) as local:
        assert local == src and files_under(local) == TREE


@pytest.mark.integration
def test_a_local_copy_of_s3_holds_the_parts_named_and_is_removed_after(s3_server, tmp_path):
    run = f"s3://{new_bucket(s3_server)}/runs/run"
    storage.put_dir(write_tree(tmp_path / "src"), run)
    with storage.local_copy(run, parts=("adapter", "run.json")) as local:
        assert files_under(local) == {k: v for k, v in TREE.items() if "checkpoint" not in k}
    assert not local.exists()
    with storage.local_copy(run) as everything:
        assert files_under(everything) == TREE


@pytest.mark.integration
def test_cached_copy_downloads_once_and_redoes_an_interrupted_copy(s3_server, tmp_path):
    bucket = new_bucket(s3_server)
    model = f"s3://{bucket}/models/m1"
    storage.put_dir(write_tree(tmp_path / "src"), model)
    cache = tmp_path / "cache"
    local = storage.cached_copy(model, cache)
    assert local == cache / bucket / "models/m1"
    assert {k: v for k, v in files_under(local).items() if k != ".download-complete"} == TREE
    assert (local / ".download-complete").is_file()
    # complete: used as it is, not downloaded again (the bucket's newer run.json is not fetched)
    storage.write_text(f"{model}/run.json", "v2")
    assert (storage.cached_copy(model, cache) / "run.json").read_text() == TREE["run.json"]
    # interrupted (no marker, a file missing): downloaded again
    (local / ".download-complete").unlink()
    (local / "adapter/adapter_config.json").unlink()
    again = storage.cached_copy(model, cache)
    assert (again / "run.json").read_text() == "v2"
    assert (again / "adapter/adapter_config.json").is_file()
    assert (again / ".download-complete").is_file()
    with pytest.raises(storage.EmptyLocation, match="no files under"):
        storage.cached_copy(f"s3://{bucket}/models/absent", cache)


# ---------------------------------------------------------------- a job on s3://


@pytest.mark.integration
def test_s3_storage_checkpoints_uploads_and_resumes(s3_server, ray_local, tiny_model_dir):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="ckpt")
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        "checkpoint.storage_path=s3://ckpt/runs",
        "run.name=remote",
        "train.max_steps=6",
        "eval.every_steps=null",
        "eval.early_stopping_patience=null",
        "eval.task_metric=none",
        "checkpoint.every_steps=null",
    ]
    # paused on a Ray Train worker, resumed in this process (scaling.local): both write and read
    # the same checkpoints in the bucket
    first = run_job(load_config("configs/quickstart.yaml", [*overrides, "run.stop_after_steps=3"]))
    assert first["status"] == "paused at step 3"
    resumed = run_job(load_config("configs/quickstart.yaml", [*overrides, "scaling.local=true"]))

    assert resumed["status"] == "completed" and resumed["resumed_at_steps"] == [3]
    assert [h["step"] for h in resumed["loss_history"]] == list(range(1, 7))
    assert resumed["adapter"] == "s3://ckpt/runs/remote/adapter"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    names = {p.removeprefix("ckpt/runs/remote/") for p in fs.find("ckpt/runs/remote")}
    assert {
        "run.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "data/manifest.json",
    } <= names
    assert any(n.startswith("checkpoint_000003/") for n in names)
    assert any(n.startswith("checkpoint_000006_final/") for n in names)
    manifest = json.loads(fs.cat("ckpt/runs/remote/run.json"))
    assert manifest["status"] == "completed" and manifest["steps"] == 6
    assert len(load(fs.cat("ckpt/runs/remote/adapter/adapter_model.safetensors"))) == 28


@pytest.mark.integration
def test_storage_path_must_be_local_or_s3(tiny_model_dir):
    with pytest.raises(ConfigError, match="checkpoint.storage_path: gs://b/p: give a local"):
        load_config(
            "configs/quickstart.yaml",
            [f"model.name_or_path={tiny_model_dir}", "checkpoint.storage_path=gs://b/p"],
        )
