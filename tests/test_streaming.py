"""Data that streams: a job's examples lie on storage and each worker reads the rows of its
steps (jobs/data/stored.py), in the order the in-memory lists gave, whatever the worker count;
nothing the size of the dataset goes to the workers through Ray."""

from __future__ import annotations

import pickle
import random
from types import SimpleNamespace

import boto3
import pytest

from jobs.config import load_config
from jobs.data import prepare as prepare_module
from jobs.data import stored
from jobs.data.prepare import prepare_data, store_sft
from jobs.finetune import StepBatches, StepPlan


def examples(n: int, seed: int = 0) -> list[dict]:
    """Rows of every kind a job stores: token ids (SFT, DPO), an int and JSON (GRPO)."""
    rng = random.Random(seed)
    return [
        {
            "input_ids": [rng.randrange(2000) for _ in range(rng.randrange(1, 40))],
            "labels": [-100, *(rng.randrange(2000) for _ in range(rng.randrange(0, 5)))],
            "index": i,
            "item": {"answer": rng.choice(["positive", "negative"]), "n": i},
        }
        for i in range(n)
    ]


@pytest.fixture
def small_groups(monkeypatch):
    monkeypatch.setattr(stored, "TARGET_GROUP_BYTES", 2048)  # many row groups of a few rows


def test_a_stored_split_reads_back_as_the_list_it_was(tmp_path, small_groups):
    rows = examples(300)
    info = stored.write_lists(str(tmp_path), {"train": rows})["train"]
    split = stored.StoredSplit(stored.split_url(str(tmp_path), "train"), **info)
    assert 1 < info["group_rows"] < 100 and info["json_columns"] == ["item"]
    assert len(split) == 300 and split[7] == rows[7] and split[-1] == rows[-1]
    assert split[5:50:3] == rows[5:50:3] and split[::-1] == rows[::-1]
    assert list(split) == rows
    order = random.Random(1).sample(range(300), 300)
    assert split.take(order) == [rows[i] for i in order]
    copy = pickle.loads(pickle.dumps(split))  # what a worker is sent: the URL and sizes
    assert len(pickle.dumps(split)) < 400 and copy.take(order[:20]) == split.take(order[:20])
    with pytest.raises(IndexError):
        split[300]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_reads_the_examples_the_lists_gave_it(tmp_path, small_groups, world):
    """A step's examples from storage are the in-memory path's, for every rank and world size,
    across an epoch boundary (a resume at any step continues exactly)."""
    rows = examples(100)
    info = stored.write_lists(str(tmp_path), {"train": rows})["train"]
    split = stored.StoredSplit(stored.split_url(str(tmp_path), "train"), **info)
    cfg = SimpleNamespace(
        train=SimpleNamespace(effective_batch_size=16, micro_batch_size=4 // world or 1),
        run=SimpleNamespace(seed=3),
    )
    plan = StepPlan(steps_per_epoch=6, total_steps=14, warmup_steps=0)
    for rank in range(world):
        rt = SimpleNamespace(rank=rank, world=world)
        batches = {
            name: StepBatches(cfg, rt, SimpleNamespace(train_examples=data, batch=list), plan)
            for name, data in (("stored", split), ("list", rows))
        }
        for step in range(plan.total_steps):
            assert batches["stored"].micro_batches(step) == batches["list"].micro_batches(step)


def test_a_job_set_is_tokenized_once_then_read_from_its_metadata(
    tmp_path, tokenizer, tiny_model_dir, monkeypatch
):
    """The driver tokenizes an SFT set into storage batch by batch; the same data again (a
    resumed run) reads only manifest.json and tokens.json, whatever the set's size."""
    cfg = load_config("configs/quickstart.yaml", [f"model.name_or_path={tiny_model_dir}"]).data
    directory = str(tmp_path / "tokens")
    args = (cfg, tokenizer, 0, str(tiny_model_dir), str(tmp_path / "prepared"), directory)
    first = store_sft(*args)
    memory = prepare_data(cfg, tokenizer, 0)
    assert list(first.train) == memory.train and list(first.eval) == memory.eval
    assert list(first.eval_conversations) == memory.eval_conversations
    assert first.train_samples == memory.train_samples
    assert first.dataset_hash == memory.dataset_hash

    prepared = cfg.model_copy(update={"prepared": str(tmp_path / "prepared")})
    args = (prepared, tokenizer, 0, str(tiny_model_dir), "", str(tmp_path / "from-prepared"))
    assert list(store_sft(*args).train) == memory.train

    def no_tokenizing(*_):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prepare_module, "tokenize_rows", no_tokenizing)
    again = store_sft(*args)
    assert len(again.train) == len(memory.train) and again.train[3] == memory.train[3]


def test_a_split_on_s3_reads_back(s3_server, small_groups):
    bucket = "streaming"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    rows = examples(120)
    directory = f"s3://{bucket}/run/data/tokens"
    info = stored.write_lists(directory, {"train": rows})["train"]
    split = stored.StoredSplit(stored.split_url(directory, "train"), **info)
    order = random.Random(2).sample(range(120), 40)
    assert split.take(order) == [rows[i] for i in order] and list(split) == rows


def test_no_worker_receives_the_dataset_through_ray(
    ray_local, tmp_path, tiny_model_dir, monkeypatch
):
    """What the driver hands Ray Train for the workers is where each split lies on storage (a
    few hundred bytes), never the rows or an object-store reference to them; a completed run
    then removes the stored token ids."""
    import ray
    import ray.train.torch
    from ray import cloudpickle

    from jobs.finetune import run_job

    sent = {}
    trainer = ray.train.torch.TorchTrainer

    def capture(*args, train_loop_config, **kwargs):
        sent.update(train_loop_config)
        return trainer(*args, train_loop_config=train_loop_config, **kwargs)

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", capture)
    cfg = load_config(
        "configs/quickstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={tmp_path}",
            "run.name=streamed",
            "train.max_steps=2",
            "eval.every_steps=null",
            "eval.early_stopping_patience=null",
            "eval.max_generate_samples=4",
            "checkpoint.every_steps=null",
            "scaling.local=true",
        ],
    )
    summary = run_job(cfg)
    data = sent["data"]
    assert not isinstance(data, ray.ObjectRef), "the dataset went through the object store"
    assert all(isinstance(v, stored.StoredSplit) for v in data.values())
    assert all(
        v.url.startswith(str(tmp_path / "streamed" / "data" / "tokens")) for v in data.values()
    )
    assert len(cloudpickle.dumps(data)) < 2000 and len(data["train"]) > 500
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert not (tmp_path / "streamed" / "data" / "tokens").exists()
