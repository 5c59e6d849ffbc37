"""A step you can see into: each progress line and run.json's loss history carry the gradient
norm, tokens/s, peak memory (and MFU on a GPU), the tracker gets them, and train.profile_steps
writes a torch profiler trace of exactly those steps into the run directory."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from core.config import ConfigError
from jobs.config import load_config
from jobs.finetune import plan_steps
from jobs.step_metrics import ModelFlops, attended_context, mfu, peak_flops
from tests.helpers import REPO


def job_config(*overrides):
    return load_config(REPO / "configs" / "quickstart.yaml", list(overrides))


def test_profile_steps_are_validated():
    assert job_config("train.profile_steps=[2, 3]").train.profile_steps == (2, 3)
    for window, message in (
        ("[3, 2]", r"\[3, 2\] must be \[first, last\] steps with 1 <= first <= last"),
        ("[0, 2]", "1 <= first <= last"),
        ("[2]", "train.profile_steps"),
    ):
        with pytest.raises(ConfigError, match=message):
            job_config(f"train.profile_steps={window}")
    with pytest.raises(ConfigError, match=r"step 9 is past the run's train.max_steps \(8\)"):
        job_config("train.profile_steps=[2, 9]", "train.max_steps=8")
    # the run's length known once the data is: 100 examples, 16 a step, 2 epochs = 12 steps
    cfg = job_config("train.profile_steps=[12, 13]", "train.epochs=2")
    with pytest.raises(ConfigError, match=r"step 13 is past the run's last step \(12\)"):
        plan_steps(100, cfg)


def test_model_flops_and_the_device_peak(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from jobs.model import add_lora

    cfg = job_config()
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg.lora)
    flops = ModelFlops.of(model)
    base = model.get_base_model()
    embed = base.get_input_embeddings().weight.numel()
    assert flops.params == sum(p.numel() for p in model.parameters()) - embed  # a lookup
    assert flops.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (flops.layers, flops.hidden) == (2, 256)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # rows of 3 and 1 tokens
    assert attended_context([{"attention_mask": mask}]) == pytest.approx((9 + 1) / 4)
    assert flops.step([{"attention_mask": mask}], 4, 256) == 4 * flops.per_token(2.5)
    assert flops.step([{"input_ids": mask}], 4, 256) == 4 * flops.per_token(256)

    cpu = torch.device("cpu")
    assert peak_flops(cpu) is None and mfu(1e12, cpu) is None
    for name, tflops in (
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        peak = peak_flops(torch.device("cuda"))
        assert peak == (tflops and tflops * 1e12), name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    assert mfu(494.7e12, torch.device("cuda")) == pytest.approx(0.5)


@pytest.mark.integration
def test_progress_lines_run_json_and_the_tracker_carry_the_step_costs_and_a_profile(
    ray_local, tiny_model_dir, tmp_path, caplog, monkeypatch
):
    """One job in this process: every logged line has the gradient norm (before clipping),
    tokens/s and rank 0's peak RSS; run.json's history and MLflow have the same numbers; the
    profiler trace holds steps 2 and 3 and no other."""
    from mlflow.tracking import MlflowClient

    from jobs.finetune import run_job

    store = tmp_path / "mlruns"
    cfg = job_config(
        f"model.name_or_path={tiny_model_dir}",
        f"checkpoint.storage_path={tmp_path / 'runs'}",
        "run.name=seen",
        "train.max_steps=4",
        "train.log_every_steps=1",
        "train.profile_steps=[2, 3]",
        "eval.every_steps=null",
        "eval.early_stopping_patience=null",
        "eval.max_generate_samples=2",
        "checkpoint.every_steps=null",
        "tracking.backend=mlflow",
        f"tracking.tracking_uri={store}",
        "scaling.local=true",
    )
    with caplog.at_level(logging.INFO, logger="jobs"):
        summary = run_job(cfg)

    history = summary["loss_history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["grad_norm"] > cfg.train.max_grad_norm for h in history)  # before clipping
    assert history[0]["tokens_per_s"] is None and all(h["tokens_per_s"] > 0 for h in history[1:])
    assert all(h["peak_memory_mb"] > 100 and h["mfu"] is None for h in history)  # CPU: no MFU
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    line = re.compile(
        r"step (\d)/4 \| loss [\d.]+ \| lr \S+ \| grad norm ([\d.]+) \| [\d,]+ tok/s \| "
        r"peak mem ([\d,]+) MiB \(RSS, rank 0\)$"
    )
    shown = [line.match(text) for text in lines]
    assert all(shown) and len(shown) == 4, lines
    for m, h in zip(shown, history, strict=True):
        assert float(m[2]) == pytest.approx(h["grad_norm"], abs=1e-3)
        assert int(m[3].replace(",", "")) == pytest.approx(h["peak_memory_mb"], abs=1)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("rayft").experiment_id])
    for key, name in (("grad_norm", "train/grad_norm"), ("peak_memory_mb", "train/peak_memory_mb")):
        points = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in points] == [1, 2, 3, 4], name
        assert [m.value for m in points] == pytest.approx([h[key] for h in history]), name
    assert "train/mfu" not in run.data.metrics

    (trace,) = (tmp_path / "runs" / "seen" / "profile").iterdir()
    assert trace.name == "rank0.steps_2-3.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}
    assert sum(e.get("cat") == "cpu_op" for e in events) > 100  # the steps' operators
    assert any(f"profiler trace of steps 2-3: {trace}" in r.getMessage() for r in caplog.records)
