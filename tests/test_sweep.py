"""tune.sweep end to end on 2 CPUs: the shipped sweep (TPE, ASHA) at a small size with its
storage and registry on a real S3-compatible server (moto's), its driver killed mid-sweep and
resumed from the bucket, at least one trial stopped early, and its best trial evaluated, gated
and promoted from there. Also the sweep config's checks and the searchers' construction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError
from tests.helpers import REPO
from tune.registry import Registry
from tune.sweep import load_sweep_config


def sweep_yaml(tmp_path: Path, tiny_model_dir: Path, job: list[str] = (), **fields) -> Path:
    """configs/sweep_reviews.yaml on the tiny model into tmp_path; `job` adds trial overrides."""
    raw = yaml.safe_load((REPO / "configs/sweep_reviews.yaml").read_text())
    raw["overrides"] += [f"model.name_or_path={tiny_model_dir}", *job]
    raw["storage_path"] = str(tmp_path / "sweeps")
    raw["promote"]["registry"] = str(tmp_path / "registry")
    raw.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def small_promotion(tmp_path: Path, registry: str | None = None) -> dict:
    """The shipped promotion on 16 eval rows, its gate open: the gate is not what a sweep test is
    about (a few steps of training need not beat the base)."""
    eval_raw = yaml.safe_load((REPO / "configs/eval_reviews.yaml").read_text())
    eval_raw["tasks"][0].update(max_samples=16, few_shot=1)
    eval_raw["gate"]["margin"] = -1.0
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_raw))
    registry = registry or str(tmp_path / "registry")
    return {
        "name": "reviews",
        "alias": "production",
        "eval": str(tmp_path / "eval.yaml"),
        "registry": registry,
    }


def first_reviews(tmp_path: Path, rows: int) -> Path:
    """The first `rows` rows of the quickstart's data, as a file in tmp_path."""
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join((REPO / "data/reviews.jsonl").read_text().splitlines(True)[:rows]))
    return path


def start_sweep(config: Path, ray_tmp: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}  # this sweep's Ray, findable to kill it whole
    return subprocess.Popen(
        [sys.executable, "-m", "tune.sweep", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_sweep(proc: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the driver and every process of its Ray (they outlive a killed driver)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    time.sleep(2)


def test_sweep_config_is_checked_before_anything_runs(tmp_path, tiny_model_dir):
    config = sweep_yaml(tmp_path, tiny_model_dir)
    cfg = load_sweep_config(config)
    assert set(cfg.space) == {"lora.r", "lora.alpha", "train.lr"}
    with pytest.raises(ConfigError, match="expected \\[low, high\\]"):
        load_sweep_config(config, ["space={train.lr: {loguniform: [0.1, 0.01]}}"])
    with pytest.raises(ConfigError, match="search: grid needs grid values"):
        load_sweep_config(config, ["search=grid"])
    with pytest.raises(ConfigError, match="unknown key 'lora.rr'"):
        load_sweep_config(config, ["space={lora.rr: {choice: [4]}}"])
    with pytest.raises(
        ConfigError, match="storage_path: gs://b/p: give a local directory or s3://"
    ):
        load_sweep_config(config, ["storage_path=gs://b/p"])
    # a job value that the space sets for every trial would have no effect: an error, not silence
    with pytest.raises(
        ConfigError,
        match="overrides: train.lr=1e-3 is overridden by space.train.lr; change the space",
    ):
        load_sweep_config(config, ["overrides=[train.lr=1e-3]"])
    with pytest.raises(ConfigError, match="job.train.lr=0.001 is overridden by space.train.lr"):
        load_sweep_config(config, ["job.train.lr=1e-3"])
    with pytest.raises(ConfigError, match="add train.weight_decay=VALUE to the sweep's overrides"):
        load_sweep_config(config, ["job.train.weight_decay=0.1"])
    assert load_sweep_config(config, ["overrides=[train.weight_decay=0.1]"]).overrides == [
        "train.weight_decay=0.1"
    ]


def test_sweep_bench_spaces():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_bench", REPO / "benchmarks/sweep_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(ranks=[8, 32], alphas=[16, 32], lrs=[2e-4, 1e-3, 5e-3])
    assert bench.grid_space(args)["train.lr"] == {"grid": [2e-4, 1e-3, 5e-3]}
    assert bench.sampled_space(args)["train.lr"] == {"loguniform": [2e-4, 5e-3]}
    one = argparse.Namespace(ranks=[4], alphas=[8], lrs=[1e-3])
    assert bench.sampled_space(one)["train.lr"] == {"choice": [1e-3]}
    assert "eval.every_steps=10" in bench.overrides(90)
    assert bench.numbers(float)("2e-4,1e-3") == [2e-4, 1e-3]


@pytest.mark.integration
@pytest.mark.slow
def test_a_sweep_on_s3_survives_a_killed_driver_and_promotes_its_best_trial_from_the_bucket(
    tmp_path, tiny_model_dir, s3_server
):
    """The shipped sweep (4 trials, ASHA) at a small size, searched by TPE (BOHB's restore is the
    same Tuner.restore; its searcher and scheduler are checked in
    test_model_based_searchers_and_their_schedulers), its storage and registry on moto's S3, one
    trial at a time so that the kill lands between two suggestions. The driver is killed once a
    trial has finished; the resumed sweep trains that trial no further, suggests only the
    rest, stops at least one at an ASHA rung, and the best trial is evaluated, gated and
    promoted from the bucket, its lineage naming the sweep."""
    import boto3
    import s3fs
    from typer.testing import CliRunner

    from tune.registry.cli import app as registry_app

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="rayft")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    reviews = first_reviews(tmp_path, 200)  # a quarter: less to prepare and evaluate
    config = sweep_yaml(
        tmp_path,
        tiny_model_dir,
        job=[
            f"data.train_files=[{reviews}]",
            "train.max_steps=8",
            "eval.every_steps=2",
            "checkpoint.every_steps=2",
            "eval.max_generate_samples=4",
            "scaling.local=true",  # each trial trains in its own process, reporting to Tune
        ],
        search="optuna",
        max_concurrent_trials=1,  # the searcher must remember its trials across the kill
        storage_path="s3://rayft/sweeps",
        promote=small_promotion(tmp_path, registry="s3://rayft/registry"),
    )
    root = "rayft/sweeps/reviews"
    ray_tmp = tempfile.mkdtemp(prefix="rsw", dir="/tmp")
    proc = start_sweep(config, ray_tmp)  # its Ray's workers inherit the S3 endpoint
    deadline, done = time.time() + 400, []
    while time.time() < deadline and proc.poll() is None and not done:
        fs.invalidate_cache()  # s3fs caches listings
        done = fs.glob(f"{root}/runs/reviews-*/run.json")  # a trial has finished
        time.sleep(0.5)
    assert done, proc.stdout.read()[-3000:] if proc.poll() is not None else "no trial finished"
    before = json.loads(fs.cat(done[0]))
    kill_sweep(proc, ray_tmp)
    assert not fs.exists(f"{root}/results.json")

    resumed = start_sweep(config, ray_tmp)
    out, _ = resumed.communicate(timeout=600)
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    assert resumed.returncode == 0, out[-4000:]
    assert "resuming the sweep from s3://rayft/sweeps/reviews/tune" in out
    fs.invalidate_cache()
    trials = json.loads(fs.cat(f"{root}/results.json"))["trials"]
    # the restored searcher knows the trials before the kill: it suggests only the rest
    assert len(trials) == 4 and not any(t["error"] for t in trials), trials
    assert len({(t["lora.r"], t["lora.alpha"], t["train.lr"]) for t in trials}) == 4
    assert sum(t["stopped_early"] for t in trials) >= 1  # ASHA stopped at least one at an eval
    assert trials[0]["best_eval_loss"] == min(t["best_eval_loss"] for t in trials)
    # the trial that finished before the kill trains no step again: if Tune had not recorded its
    # end, it restarts, finds its final checkpoint and only rewrites run.json
    after = json.loads(fs.cat(done[0]))
    assert after["loss_history"] == before["loss_history"]
    assert after["resumed_at_steps"] in ([], [before["steps"]])
    for t in trials:
        assert t["run_dir"] == f"s3://{root}/runs/reviews-{t['trial']}"
    for name in ("results.csv", "eval_curves.png", "eval_loss_vs_train_lr.png"):
        assert fs.size(f"{root}/{name}") > 0, name
    assert "best eval loss" in out and "stopped early?" in out
    assert not (tmp_path / "sweeps").exists() and not (REPO / "s3:").exists()  # nothing local

    best = trials[0]["run_dir"]
    promotion = json.loads(fs.cat(f"{root}/promotion.json"))
    assert promotion["promoted"] and promotion["run_dir"] == best, promotion
    evaluation = json.loads(fs.cat(f"{best}/eval.json"))  # written beside the run, in the bucket
    assert evaluation["adapter"] == f"{best}/adapter" and evaluation["gate"]["passed"]
    registry = Registry("s3://rayft/registry")
    lineage = registry.lineage("reviews@production")
    assert lineage["version"] == promotion["version"] and lineage["run"]["dir"] == best
    assert lineage["sweep"]["name"] == "reviews" and lineage["sweep"]["trial"] == trials[0]["trial"]
    assert lineage["gate"]["passed"] and lineage["dataset_hash"].startswith("sha256:")
    # the registry CLI takes the s3:// run directory as well (its gate result is in eval.json)
    cli = CliRunner().invoke(
        registry_app,
        ["promote", best, "--name", "reviews-cli", "--registry", "s3://rayft/registry"],
    )
    assert cli.exit_code == 0, cli.output
    assert registry.lineage("reviews-cli@production")["run"]["dir"] == best


def test_model_based_searchers_and_their_schedulers(tmp_path, tiny_model_dir):
    from ray.tune.schedulers import ASHAScheduler, HyperBandForBOHB
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.bohb import TuneBOHB
    from ray.tune.search.optuna import OptunaSearch

    from tune.search import search_algorithm, trial_scheduler

    config = sweep_yaml(tmp_path, tiny_model_dir)
    optuna = load_sweep_config(config, ["search=optuna"])
    searcher = search_algorithm(optuna)
    assert isinstance(searcher, ConcurrencyLimiter) and isinstance(searcher.searcher, OptunaSearch)
    assert searcher.max_concurrent == optuna.max_concurrent_trials
    assert isinstance(trial_scheduler(optuna, 15, 60), ASHAScheduler)
    bohb = load_sweep_config(config, ["search=bohb", "scheduler.type=hyperband"])
    assert isinstance(search_algorithm(bohb).searcher, TuneBOHB)
    assert isinstance(trial_scheduler(bohb, 15, 60), HyperBandForBOHB)
    with pytest.raises(ConfigError, match="search: bohb and scheduler.type: hyperband go together"):
        load_sweep_config(config, ["search=bohb"])
    with pytest.raises(ConfigError, match="search: optuna samples; use choice, not grid"):
        load_sweep_config(config, ["search=optuna", "space={lora.r: {grid: [4, 8]}}"])


def test_a_grid_under_asha_runs_every_point_once_in_a_seeded_shuffled_order(
    tmp_path, tiny_model_dir
):
    from tune.search import grid_points, num_samples, search_space

    grid = "space={lora.r: {grid: [4, 8]}, train.lr: {grid: [0.0001, 0.001, 0.01]}}"
    config = sweep_yaml(tmp_path, tiny_model_dir)
    cfg = load_sweep_config(config, ["search=grid", grid, "num_trials=1"])
    points = grid_points(cfg)
    assert len(points) == num_samples(cfg) == 6
    assert {(p["lora.r"], p["train.lr"]) for p in points} == {
        (r, lr) for r in (4, 8) for lr in (0.0001, 0.001, 0.01)
    }
    assert (
        points
        == grid_points(cfg)
        != grid_points(load_sweep_config(config, ["search=grid", grid, "seed=1"]))
    )
    assert points != sorted(points, key=lambda p: (p["lora.r"], p["train.lr"]))
    # without ASHA the order does not matter: Tune's own grid, num_trials repeats of it
    fifo = load_sweep_config(config, ["search=grid", grid, "scheduler.type=none"])
    assert num_samples(fifo) == fifo.num_trials and "grid_search" in search_space(fifo)["lora.r"]


def test_asha_replay_follows_rays_bracket():
    from tune.search import asha_rungs, replay_asha

    assert asha_rungs(10, 3, 91) == [10, 30, 90]
    assert asha_rungs(20, 2, 61) == [20, 40]
    good = [(10, 1.0), (20, 0.8), (30, 0.5), (40, 0.4)]
    bad = [(10, 2.0), (20, 1.9), (30, 1.8), (40, 1.7)]
    # one at a time, the good trial first: the bad one is stopped at the first rung
    assert replay_asha([good, bad], 10, 2, 1, 41) == [40, 10]
    # the bad one first passes unopposed; the good one, better at every rung, goes on too
    assert replay_asha([bad, good], 10, 2, 1, 41) == [40, 40]
    # two at a time: the third starts when the second stops, and is compared with both
    assert replay_asha([good, bad, bad], 10, 2, 2, 41) == [40, 10, 10]


@pytest.mark.integration  # the CLI in a subprocess
def test_explain_prints_the_plan_and_runs_nothing(tmp_path, tiny_model_dir):
    config = sweep_yaml(tmp_path, tiny_model_dir)
    out = subprocess.run(
        [sys.executable, "-m", "tune.sweep", str(config), "--explain"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sweep reviews: 4 trials of configs/quickstart.yaml, 2 at a time" in out.stdout
    assert "train.lr: loguniform [0.0001, 0.003]" in out.stdout
    assert "rungs at steps 15, 60: past a rung only the best 1/4 so far go on" in out.stdout
    assert "60 steps a trial, 240 if every trial ran to its end; stops at 1800 s" in out.stdout
    assert "each trial: 1 worker(s) x 1 CPU" in out.stdout
    assert not (tmp_path / "sweeps").exists()


def test_budget_stopper_stops_the_sweep_at_its_steps_or_worker_hours():
    from tune.sweep import BudgetConfig, BudgetStopper

    steps = BudgetStopper(BudgetConfig(steps=50), workers_per_trial=1)
    assert not steps("a", {"step": 20, "time_total_s": 5}) and not steps("b", {"step": 20})
    assert not steps("a", {"step": 29})  # a trial's latest step, not a sum of its reports
    assert steps("b", {"step": 21}) and steps.stop_all()
    hours = BudgetStopper(BudgetConfig(worker_hours=1.0), workers_per_trial=2)
    assert not hours("a", {"time_total_s": 1700, "step": 10**6})
    assert hours("b", {"time_total_s": 100})


def test_placement_groups_left_by_stopped_trials_are_released(ray_local):
    import ray
    from ray.util.placement_group import placement_group

    from tune.sweep import release_stranded_placement_groups

    # what a trial stopped while its Train workers start leaves: a group no cleaner knows of
    group = placement_group([{"CPU": 1}])
    ray.get(group.ready(), timeout=60)
    cpus = ray.available_resources().get("CPU", 0)
    assert release_stranded_placement_groups() >= 1
    deadline = time.time() + 60  # the raylet returns the bundle's CPU asynchronously
    while ray.available_resources().get("CPU", 0) < cpus + 1 and time.time() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) >= cpus + 1
    assert release_stranded_placement_groups() == 0


def test_a_packed_sweep_runs_as_many_trials_as_it_packs_and_is_checked_at_load(
    tmp_path, tiny_model_dir
):
    config = sweep_yaml(tmp_path, tiny_model_dir, job=["lora.dropout=0"])
    raw = yaml.safe_load(config.read_text())
    del raw["max_concurrent_trials"]
    unset = tmp_path / "unset.yaml"
    unset.write_text(yaml.safe_dump(raw))
    assert load_sweep_config(unset, ["pack_trials=3"]).max_concurrent_trials == 3
    assert load_sweep_config(config, ["pack_trials=2"]).max_concurrent_trials == 2
    with pytest.raises(ConfigError, match="max_concurrent_trials: 2 with pack_trials: 3"):
        load_sweep_config(config, ["pack_trials=3", "max_concurrent_trials=2"])
    with pytest.raises(ConfigError, match="space.data.max_seq_len cannot vary between packed"):
        load_sweep_config(config, ["pack_trials=2", "space={data.max_seq_len: {choice: [64]}}"])
    with pytest.raises(ConfigError, match="lora.dropout"):  # packed rows share one RNG
        load_sweep_config(sweep_yaml(tmp_path, tiny_model_dir), ["pack_trials=2"])
