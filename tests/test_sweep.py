"""tune.sweep end to end on 2 CPUs: a 4-trial ASHA sweep of the job whose driver is killed
mid-sweep, resumed, finished with at least one trial stopped early, and whose best trial is
evaluated, gated and promoted. Also the sweep config's checks."""

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

from jobs.config import ConfigError
from tests.helpers import REPO
from tune.registry import Registry
from tune.sweep import load_sweep_config


def sweep_yaml(tmp_path: Path, tiny_model_dir: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs/sweep_reviews.yaml").read_text())
    raw["overrides"].append(f"model.name_or_path={tiny_model_dir}")
    raw["storage_path"] = str(tmp_path / "sweeps")
    raw["promote"]["registry"] = str(tmp_path / "registry")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_sweep(config: Path, ray_tmp: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}  # this sweep's Ray, findable to kill it whole
    return subprocess.Popen(
        [sys.executable, "-m", "tune.sweep", str(config)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def kill_sweep(proc: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the driver and every process of its Ray (they outlive a killed driver)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    time.sleep(2)


@pytest.mark.integration
@pytest.mark.slow
def test_asha_sweep_survives_a_killed_driver_and_promotes_its_best_trial(tmp_path, tiny_model_dir):
    config = sweep_yaml(tmp_path, tiny_model_dir)
    root = tmp_path / "sweeps" / "reviews"
    ray_tmp = tempfile.mkdtemp(prefix="rsw", dir="/tmp")  # Ray's socket paths must stay short

    proc = start_sweep(config, ray_tmp)
    deadline = time.time() + 400
    first_done = None
    while time.time() < deadline and proc.poll() is None:  # kill once one trial has finished
        done = sorted((root / "runs").glob("*/run.json"))
        if done:
            first_done = done[0]
            break
        time.sleep(2)
    assert first_done is not None, proc.stdout.read()[-3000:] if proc.poll() is not None else "no trial finished in time"  # fmt: skip
    before = json.loads(first_done.read_text())
    kill_sweep(proc, ray_tmp)
    assert not (root / "results.json").exists()

    resumed = start_sweep(config, ray_tmp)
    out, _ = resumed.communicate(timeout=600)
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    assert resumed.returncode == 0, out[-4000:]
    assert "resuming the sweep" in out

    summary = json.loads((root / "results.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 4 and not any(t["error"] for t in trials)
    assert sum(t["stopped_early"] for t in trials) >= 1  # ASHA stopped at least one at an eval
    assert trials[0]["best_eval_loss"] == min(t["best_eval_loss"] for t in trials)
    # the trial that finished before the kill trains no step again: if Tune had not recorded its
    # end, it restarts, finds its final checkpoint and only rewrites run.json
    after = json.loads(first_done.read_text())
    assert after["loss_history"] == before["loss_history"]
    assert after["resumed_at_steps"] in ([], [before["steps"]])
    for name in ("results.csv", "eval_curves.png", "eval_loss_vs_train_lr.png", "eval_loss_vs_lora_r.png"):  # fmt: skip
        assert (root / name).stat().st_size > 0, name
    assert "best eval loss" in out and "stopped early?" in out

    promotion = json.loads((root / "promotion.json").read_text())
    assert promotion["promoted"], promotion
    lineage = Registry(str(tmp_path / "registry")).lineage("reviews@production")
    assert lineage["version"] == promotion["version"]
    assert lineage["sweep"]["name"] == "reviews" and lineage["sweep"]["trial"] == promotion["trial"]
    assert lineage["gate"]["passed"] and lineage["dataset_hash"].startswith("sha256:")


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
