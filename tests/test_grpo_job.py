"""GRPO as a Ray job: rollout actors, resume, a killed rollout actor, async rollouts.

The README's two GRPO commands run here at a small size: `warm_start` is configs/grpo_warmstart.yaml
and every run is configs/grpo.yaml with overrides. The demo-size run (80 steps of 16 prompts x 8
completions) is README's measured result, not a test: learning is shown here on a reward every
prompt can earn, in 8 steps."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import ray

from jobs.config import load_config
from jobs.demo_data import make_prompt_rows
from jobs.finetune import run_job
from jobs.rollout import actor_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def warm_start(tiny_model_dir, tmp_path_factory, ray_local) -> str:
    """configs/grpo_warmstart.yaml, cut to 20 steps: an SFT adapter that answers with a label,
    rarely the one the tests' grader wants ("positive"), so that a rise has room."""
    out = tmp_path_factory.mktemp("warm")
    cfg = load_config(
        "configs/grpo_warmstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={out}",
            "train.max_steps=20",
            "scaling.local=true",  # in this process: no worker to start
        ],
    )
    return run_job(cfg)["adapter"]


def grpo_job(tiny_model_dir, tmp_path, warm_start, name: str, *overrides: str):
    """configs/grpo.yaml at a small size: 6 prompts x 4 completions a step."""
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in make_prompt_rows(60)))
    return load_config(
        "configs/grpo.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={tmp_path}",
            f"run.name={name}",
            f"lora.init_from={warm_start}",
            f"data.train_files=[{data}]",
            "train.lr=5e-4",
            "train.grpo.temperature=1.0",
            "train.max_steps=6",
            "train.micro_batch_size=3",
            "train.effective_batch_size=6",
            "train.grpo.num_generations=4",
            "train.grpo.beta=0.04",
            "train.grpo.grader.reference=positive",
            "eval.every_steps=3",
            "eval.max_generate_samples=8",
            "checkpoint.every_steps=3",
            *overrides,
        ],
    )


def per_step(summary: dict) -> list[tuple]:
    return [(h["step"], h["reward"], h["loss"], h.get("kl")) for h in summary["loss_history"]]


def assert_same_steps(a: list[tuple], b: list[tuple]) -> None:
    assert [s[0] for s in a] == [s[0] for s in b]
    for x, y in zip(a, b, strict=True):
        assert x[1:] == pytest.approx(y[1:], rel=1e-4, abs=1e-7), (x, y)


def kill_rollout_actor_at(run_name: str, version: int, killed: dict) -> threading.Thread:
    """A thread that waits for the run's rollout actor to hold `version`, then kills it (Ray
    restarts it: rollout.max_restarts); `killed` gets the pids before and after."""

    def watch():
        actor = None
        while actor is None:
            try:
                actor = ray.get_actor(actor_name(run_name, 0))
            except ValueError:
                threading.Event().wait(0.2)
        while (ray.get(actor.loaded_version.remote()) or 0) < version:
            threading.Event().wait(0.1)
        killed["before"] = before = ray.get(actor.pid.remote())
        ray.kill(actor, no_restart=False)
        # the kill lands asynchronously: a call may still reach the old process
        killed["after"] = before
        while killed["after"] == before:
            with contextlib.suppress(ray.exceptions.RayActorError):
                killed["after"] = ray.get(actor.pid.remote(), timeout=300)
            threading.Event().wait(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def whole(tiny_model_dir, tmp_path_factory, warm_start) -> dict:
    """The uninterrupted 6-step run the others are compared with, in this process (its
    rollouts on a Ray actor)."""
    out = tmp_path_factory.mktemp("whole")
    summary = run_job(grpo_job(tiny_model_dir, out, warm_start, "whole", "scaling.local=true"))
    assert summary["objective"] == "grpo" and summary["steps"] == 6
    return summary


@pytest.mark.slow
def test_two_workers_then_a_resume_on_one_with_its_actor_killed_match_the_whole_run(
    tiny_model_dir, tmp_path, warm_start, whole
):
    """Fixed seeds. Steps 1-3 on two train workers (rank 0 samples every rank's groups, each rank
    trains on its share, the step's loss is one big batch's), stopped; then resumed in this
    process (one worker, scaling.local) with its rollout actor killed once it holds version 4:
    rewards and losses match the uninterrupted one-worker run step by step."""
    two = grpo_job(
        tiny_model_dir,
        tmp_path,
        warm_start,
        "resumed",
        "run.stop_after_steps=3",
        "scaling.num_workers=2",
    )
    two.scaling.cpus_per_worker = two.rollout.cpus_per_actor = 0.5
    first = run_job(two)
    assert first["status"] == "paused at step 3"
    assert_same_steps(per_step(first), per_step(whole)[:3])
    killed: dict = {}
    watcher = kill_rollout_actor_at("resumed", 4, killed)
    resumed = run_job(
        grpo_job(tiny_model_dir, tmp_path, warm_start, "resumed", "scaling.local=true")
    )
    watcher.join(timeout=60)
    assert resumed["resumed_at_steps"] == [3]
    assert killed["before"] != killed["after"]  # the actor was restarted in a new process
    assert_same_steps(per_step(resumed), per_step(whole))
    assert resumed["metrics"]["eval_reward"] == whole["metrics"]["eval_reward"]


@pytest.mark.slow  # shares the module's warm start with the other slow tests (~40 s more)
def test_grpo_job_learns_a_reward_and_records_what_produced_it(
    tiny_model_dir, tmp_path, warm_start
):
    """A reward every prompt can earn (answer "positive"): the held-out reward rises from the
    start, every step records the grader's metrics, TRL's, and the time in generation; with
    async_steps 1 later batches were sampled one adapter version behind."""
    cfg = grpo_job(
        tiny_model_dir,
        tmp_path,
        warm_start,
        "async",
        "train.max_steps=8",
        "rollout.async_steps=1",
        "scaling.local=true",  # in this process, its rollouts on Ray actors
    )
    summary = run_job(cfg)
    m = summary["metrics"]
    assert m["eval_reward"] > m["base_eval_reward"] + 0.3, m
    history = summary["loss_history"]
    expected = {"reward", "reward_std", "reward_label", "kl", "entropy", "clip_ratio"}
    expected |= {"frac_reward_zero_std", "completion_length", "generation_s", "training_s"}
    assert expected <= set(history[-1]), set(history[-1])
    assert history[0]["staleness"] == 0 and all(h["staleness"] == 1 for h in history[1:])
    assert (tmp_path / "async" / "reward_curve.png").stat().st_size > 1000
    assert [e["step"] for e in summary["eval_history"]] == [3, 6]
