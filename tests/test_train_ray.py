"""The job on real Ray Train workers: one worker end to end; two workers, paused, resumed on one."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from peft import PeftModel

from inference.model import load_base_model, load_tokenizer
from inference.runtime import Runtime
from jobs.config import load_config
from jobs.data.prepare import prepare_data
from jobs.evaluation import eval_loss
from jobs.finetune import run_job

pytestmark = pytest.mark.integration


def job_config(tiny_model_dir, storage, *overrides):
    return load_config(
        "configs/quickstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={storage}",
            "eval.max_generate_samples=16",
            "eval.early_stopping_patience=null",
            *overrides,
        ],
    )


STEPS = [
    "train.max_steps=12",
    "train.effective_batch_size=16",
    "lora.dropout=0",
    "eval.every_steps=4",
    "eval.task_metric=none",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=2",
    "scaling.cpus_per_worker=1",
]


@pytest.fixture(scope="module")
def one_worker(ray_local, tiny_model_dir, tmp_path_factory):
    """The uninterrupted one-worker run: checked end to end below, and the reference that the
    two-worker, paused and resumed run must reproduce step by step."""
    storage = tmp_path_factory.mktemp("train-ray")
    cfg = job_config(tiny_model_dir, storage, "run.name=one", *STEPS)
    return cfg, storage, run_job(cfg)


def test_single_worker_job_writes_an_adapter_that_reloads_exactly(one_worker, tiny_model_dir):
    cfg, storage, summary = one_worker
    run_dir = storage / "one"
    adapter = run_dir / "adapter"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    ):
        assert (adapter / name).is_file(), name
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["dataset_hash"].startswith("sha256:")
    # the inline data prep's manifest stays with the run, and its hash is the run's
    data_manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert data_manifest["dataset_hash"] == manifest["dataset_hash"]
    assert manifest["data_report"]["counts"] == data_manifest["counts"]
    assert manifest["base_model"] == str(tiny_model_dir)
    assert manifest["libraries"]["ray"] == ray.__version__
    assert manifest["config"]["lora"]["r"] == 16
    assert [h["step"] for h in manifest["loss_history"]] == list(range(1, 13))
    assert [e["step"] for e in manifest["eval_history"]] == [4, 8, 12]
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_000008",
        "checkpoint_000012_final",
    ]  # keep_last

    metrics = summary["metrics"]
    assert metrics["eval_loss"] < metrics["base_eval_loss"] / 2

    # Plain peft loads the adapter and reproduces the trained model's held-out loss.
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.run.seed)
    cpu = torch.device("cpu")
    base = load_base_model(cfg.model, cpu)
    batch = tokenizer(["Review: The lid is sturdy and the app is fast."], return_tensors="pt")
    base_logits = base(**batch).logits
    model = PeftModel.from_pretrained(base, adapter)
    loss = eval_loss(model, data.eval, 32, tokenizer.pad_token_id, Runtime(cpu))
    assert loss == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert not torch.allclose(
        model(**batch).logits, base_logits, atol=1e-3
    )  # the adapter does something


def test_two_workers_then_a_resume_on_one_continue_exactly(one_worker, tiny_model_dir):
    """Same seed and data. Steps 1-6 on 2 DDP workers x 8, stopped, then resumed on 1 worker
    x 16: every step's loss, every held-out evaluation and the final eval loss are the
    uninterrupted one-worker run's (the two workers compute one worker's steps, and the resume
    continues where the pause left)."""
    _, storage, full = one_worker
    first = run_job(
        job_config(
            tiny_model_dir,
            storage,
            "run.name=split",
            "run.stop_after_steps=6",
            "scaling.num_workers=2",
            "train.micro_batch_size=8",
            *STEPS,
        )
    )
    assert first["status"] == "paused at step 6"
    assert [h["step"] for h in first["loss_history"]] == list(range(1, 7))
    expected = [h["loss"] for h in full["loss_history"]]
    assert [h["loss"] for h in first["loss_history"]] == pytest.approx(expected[:6], rel=1e-4)
    resumed = run_job(job_config(tiny_model_dir, storage, "run.name=split", *STEPS))

    assert resumed["status"] == "completed"
    assert resumed["resumed_at_steps"] == [6] and full["resumed_at_steps"] == []
    assert [h["step"] for h in resumed["loss_history"]] == list(range(1, 13))  # no repeat or gap
    assert [h["loss"] for h in resumed["loss_history"]] == pytest.approx(expected, rel=1e-4)
    evals, reference = resumed["eval_history"], full["eval_history"]
    assert [e["step"] for e in evals] == [e["step"] for e in reference] == [4, 8, 12]
    assert [e["eval_loss"] for e in evals] == pytest.approx(
        [e["eval_loss"] for e in reference], rel=1e-4
    )
    assert resumed["metrics"]["eval_loss"] == pytest.approx(full["metrics"]["eval_loss"], rel=1e-4)


def test_a_job_in_this_process_computes_the_workers_steps(one_worker, tiny_model_dir):
    """scaling.local (Ray Train's local mode): paused at step 6 and resumed, in this process,
    it trains the worker run's steps, evaluates the same, keeps the same checkpoints
    (checkpoint.keep_last), and gives this process its torch threads back."""
    _, storage, full = one_worker
    threads = torch.get_num_threads()
    here = [*STEPS, "scaling.local=true", "run.name=here"]
    first = run_job(job_config(tiny_model_dir, storage, *here, "run.stop_after_steps=6"))
    assert first["status"] == "paused at step 6"
    resumed = run_job(job_config(tiny_model_dir, storage, *here))

    assert resumed["status"] == "completed" and resumed["resumed_at_steps"] == [6]
    expected = [h["loss"] for h in full["loss_history"]]
    assert [h["loss"] for h in resumed["loss_history"]] == pytest.approx(expected, rel=1e-4)
    assert [e["eval_loss"] for e in resumed["eval_history"]] == pytest.approx(
        [e["eval_loss"] for e in full["eval_history"]], rel=1e-4
    )
    assert resumed["metrics"]["eval_loss"] == pytest.approx(full["metrics"]["eval_loss"], rel=1e-4)
    assert sorted(p.name for p in (storage / "here").glob("checkpoint_0*")) == [
        "checkpoint_000008",
        "checkpoint_000012_final",
    ]
    assert (storage / "here" / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.get_num_threads() == threads  # the job ran with scaling.cpus_per_worker: 1
