"""The recipe's parts without Ray: the Runtime, the objective a config picks, each step's
batches, the throughput meter, and the scratch directories that killed runs leave behind."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from inference.runtime import Runtime, resolve_dtype, resolve_precision
from jobs.batching import epoch_permutation, step_micro_batches
from jobs.config import load_config
from jobs.finetune import StepBatches, Throughput, plan_steps, scratch_dir
from jobs.objectives import DPO, SFT, make_objective
from jobs.parallel import collective_forward, job_runtime


def job(*overrides):
    return load_config("configs/quickstart.yaml", list(overrides))


def test_runtime_decides_precision_dtype_and_lockstep_once():
    cpu = torch.device("cpu")
    rt = job_runtime(job(), cpu)
    assert (rt.rank, rt.world, rt.precision) == (0, 1, "fp32")  # auto: this CPU has no bf16 units
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_dtype("auto", cpu) == torch.float32
    with rt.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with Runtime(cpu, precision="bf16").autocast():
        assert torch.is_autocast_enabled("cpu")
    assert not collective_forward(job()) and collective_forward(job("train.strategy=fsdp"))
    zero3 = job("train.strategy=deepspeed", "train.deepspeed.stage=3")
    assert collective_forward(zero3)
    assert not Runtime(
        cpu, world=1, collective_forward=True
    ).lockstep  # one rank: nothing to wait for
    assert Runtime(cpu, world=2, collective_forward=True).lockstep


class Tokenizer:
    pad_token_id = 0


DATA = {
    "train": [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 40,
    "eval": [],
    "eval_conversations": [],
}


def test_the_config_picks_the_objective():
    cpu = Runtime(torch.device("cpu"))
    assert type(make_objective(job(), cpu, Tokenizer(), DATA)) is SFT
    dpo = job("train.method=dpo", "data.train_files=[data/review_pairs.jsonl]")
    assert type(make_objective(dpo, cpu, Tokenizer(), DATA)) is DPO


@pytest.mark.parametrize("rank", [0, 1])
def test_step_batches_are_each_ranks_share_of_the_epoch_order(rank):
    cfg = job("train.effective_batch_size=8", "train.micro_batch_size=2", "scaling.num_workers=2")
    rt = Runtime(torch.device("cpu"), rank=rank, world=2)
    train = [{"input_ids": [i + 1], "labels": [i + 1]} for i in range(20)]
    obj = make_objective(cfg, rt, Tokenizer(), {**DATA, "train": train})
    plan = plan_steps(len(train), cfg)
    batches = StepBatches(cfg, rt, obj, plan)
    for step in (0, 1, 2, 5):  # 2 steps per epoch: 5 is the second step of epoch 2
        epoch, k = divmod(step, plan.steps_per_epoch)
        order = epoch_permutation(len(train), cfg.run.seed, epoch).tolist()
        want = [[i + 1 for i in idx] for idx in step_micro_batches(order, k, 8, rank, 2, 2)]
        got = [b["input_ids"][:, 0].tolist() for b in batches.micro_batches(step)]
        assert got == want


def test_throughput_leaves_out_the_first_step():
    meter = Throughput()
    meter.add(1, tokens=10_000, seconds=100.0)  # step 1: allocations, lazy init
    meter.add(2, tokens=300, seconds=1.0)
    meter.add(3, tokens=100, seconds=1.0)
    assert meter.rate() == 200.0


def test_a_run_removes_the_scratch_dirs_of_processes_that_are_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f"rayft-data-{gone.pid}-abc").mkdir()  # a sweep trial killed by ASHA
    (tmp_path / f"rayft-data-{os.getpid()}-def").mkdir()  # a run still going
    new = Path(scratch_dir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"rayft-data-{os.getpid()}-def", new.name]
    )
    assert new.name.startswith(f"rayft-data-{os.getpid()}-")
