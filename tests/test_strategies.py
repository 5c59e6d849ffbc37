"""Sharding strategies on 2 CPU workers (gloo): DDP, FSDP2 and DeepSpeed ZeRO-3.

Same seed, data and global batch: every strategy computes the same steps. Sharded runs are
paused half way and resumed from their own checkpoint format (FSDP grad_op with LoRA, FSDP full
sharding in the full fine-tune test, ZeRO-3), and the whole loss history (before and after the
resume) is compared with one uninterrupted DDP run; the adapters they save load in plain peft
and equal the DDP adapter.

Tolerances: losses rel 1e-4 (float32 on CPU; the sums are reduced in a different order under
each strategy, measured differences are ~1e-6), adapter weights atol 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from core.config import ConfigError
from jobs.config import load_config
from jobs.finetune import run_job
from jobs.parallel import deepspeed_config

pytestmark = pytest.mark.integration

COMMON = [
    "train.max_steps=6",
    "train.micro_batch_size=4",
    "train.effective_batch_size=16",  # 2 workers x 4 x 2 accumulation steps
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=1",
    "eval.every_steps=null",
    "eval.early_stopping_patience=null",
    "eval.task_metric=none",
    "checkpoint.every_steps=null",
]


def job(tiny_model_dir, storage, name, *overrides):
    return load_config(
        "configs/quickstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={storage}",
            f"run.name={name}",
            *COMMON,
            *overrides,
        ],
    )


def paused_and_resumed(tiny_model_dir, storage, name, *overrides) -> dict:
    first = run_job(job(tiny_model_dir, storage, name, "run.stop_after_steps=3", *overrides))
    assert first["status"] == "paused at step 3"
    resumed = run_job(job(tiny_model_dir, storage, name, *overrides))
    assert resumed["status"] == "completed" and resumed["resumed_at_steps"] == [3]
    return resumed


@pytest.fixture(scope="module")
def ddp_run(ray_local, tiny_model_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("ddp")
    return run_job(job(tiny_model_dir, storage, "ddp", "train.strategy=ddp"))


def losses(summary):
    return [h["loss"] for h in summary["loss_history"]]


def grad_norms(summary):
    return [h["grad_norm"] for h in summary["loss_history"]]


@pytest.mark.parametrize(
    "strategy",
    [
        # gradient checkpointing on (the default for real models) and grad_op sharding
        ["train.strategy=fsdp", "train.gradient_checkpointing=true", "train.fsdp.sharding=grad_op"],
        # ZeRO-2 is the same engine code (benchmarks/gpu_check.py's CPU smoke trains it)
        [
            "train.strategy=deepspeed",
            "train.deepspeed.stage=3",
            "train.deepspeed.offload_optimizer=true",
        ],
    ],
    ids=["fsdp-grad_op-checkpointing", "zero3-offload"],
)
@pytest.mark.slow
def test_strategy_trains_resumes_and_saves_the_ddp_adapter(
    ddp_run, tiny_model_dir, tmp_path, strategy
):
    run = paused_and_resumed(tiny_model_dir, tmp_path, "sharded", *strategy)

    assert [h["step"] for h in run["loss_history"]] == list(range(1, 7))
    assert losses(run) == pytest.approx(losses(ddp_run), rel=1e-4)
    # every strategy reports the global gradient norm: FSDP2's DTensor shards, DeepSpeed's engine
    assert grad_norms(run) == pytest.approx(grad_norms(ddp_run), rel=1e-3)
    assert run["metrics"]["eval_loss"] == pytest.approx(ddp_run["metrics"]["eval_loss"], rel=1e-4)
    assert run["strategy"] == strategy[0].split("=")[1]

    # the whole adapter (not rank 0's shard, not empty), equal to the DDP run's
    ours = load_file(f"{run['adapter']}/adapter_model.safetensors")
    ref = load_file(f"{ddp_run['adapter']}/adapter_model.safetensors")
    assert ours.keys() == ref.keys() and len(ours) == 2 * 7 * 2  # A, B x 7 linears x 2 layers
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        torch.testing.assert_close(ours[key], ref[key], atol=1e-4, rtol=0)
    # and plain peft loads it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run["adapter"])
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == sum(
        t.numel() for t in ours.values()
    )


@pytest.mark.slow
def test_full_fine_tune_under_fsdp_saves_a_consolidated_model(ray_local, tiny_model_dir, tmp_path):
    run = paused_and_resumed(
        tiny_model_dir, tmp_path, "full", "lora=null", "train.strategy=fsdp", "train.lr=1e-4"
    )
    # the reference unsharded on one worker in this process: no LoRA, so no dropout mask that
    # depends on the worker count (a step's examples do not)
    one = ["scaling.num_workers=1", "scaling.local=true"]
    ref = run_job(job(tiny_model_dir, tmp_path, "full-ddp", "lora=null", "train.lr=1e-4", *one))
    assert losses(run) == pytest.approx(losses(ref), rel=1e-4)
    assert grad_norms(run) == pytest.approx(grad_norms(ref), rel=1e-3)
    assert run["adapter"] is None and run["method"] == "full" and run["objective"] == "sft"
    manifest = json.loads((tmp_path / "full" / "run.json").read_text())
    assert manifest["model"] == run["model"]
    # a plain transformers checkpoint, every weight moved by training, equal to the DDP model's
    tuned = AutoModelForCausalLM.from_pretrained(run["model"])
    ddp = AutoModelForCausalLM.from_pretrained(ref["model"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned_sd, ddp_sd, base_sd = tuned.state_dict(), ddp.state_dict(), base.state_dict()
    assert tuned_sd.keys() == base_sd.keys()
    moved = [k for k in base_sd if not torch.equal(tuned_sd[k], base_sd[k])]
    assert len(moved) == len(list(base.parameters()))
    for key in base_sd:
        torch.testing.assert_close(tuned_sd[key], ddp_sd[key], atol=1e-4, rtol=0)
    # the base was measured before training: the tuned model beats it
    assert run["metrics"]["eval_loss"] < run["metrics"]["base_eval_loss"]


def test_deepspeed_config_is_generated_and_a_user_file_merged(tmp_path, tiny_model_dir):
    cfg = job(
        tiny_model_dir,
        tmp_path,
        "ds",
        "train.strategy=deepspeed",
        "train.deepspeed.stage=3",
        "train.deepspeed.offload_params=true",
        "train.max_grad_norm=0.5",
    )
    generated = deepspeed_config(cfg, world=2)
    assert generated["train_batch_size"] == 16
    assert generated["train_micro_batch_size_per_gpu"] == 4
    assert generated["gradient_accumulation_steps"] == 2
    assert generated["gradient_clipping"] == 0.5
    assert generated["zero_optimization"]["stage"] == 3
    assert generated["zero_optimization"]["offload_param"]["device"] == "cpu"

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {"zero_optimization": {"overlap_comm": True}, "train_micro_batch_size_per_gpu": "auto"}
        )
    )
    cfg.train.deepspeed.config = str(user)
    merged = deepspeed_config(cfg, world=2)
    assert merged["zero_optimization"]["overlap_comm"] is True
    assert merged["zero_optimization"]["stage"] == 3  # kept from ours
    assert merged["train_micro_batch_size_per_gpu"] == 4

    user.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"ds.json: train_batch_size is 64, .* give 16"):
        deepspeed_config(cfg, world=2)
    user.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(cfg, world=2)
