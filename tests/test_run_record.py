"""run.json: secrets redacted at any depth, versions and code state recorded."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.run_record import git_state, hardware, redact, scrub, write_run_manifest

REPO = Path(__file__).resolve().parents[1]


def test_redact_masks_secret_keys_at_any_depth():
    config = {
        "tracking": {"api_key": "sk-live-123", "project": "p"},
        "storage": [{"aws_secret_access_key": "abc", "endpoint": "http://127.0.0.1:9000"}],
        "token": "t0k",
        "password": "",
        "lr": 1e-4,
    }
    out = redact(config)
    assert out["tracking"] == {"api_key": "***", "project": "p"}
    assert out["storage"] == [{"aws_secret_access_key": "***", "endpoint": "http://127.0.0.1:9000"}]
    assert out["token"] == "***" and out["lr"] == 1e-4
    assert out["password"] == ""  # nothing to hide
    assert config["token"] == "t0k"  # the input is untouched


def test_run_manifest_records_versions_and_hides_secrets(tmp_path):
    path = tmp_path / "run.json"
    write_run_manifest(
        path, config={"wandb": {"api_key": "sk-secret"}}, dataset_hash="sha256:x", metrics={"a": 1}
    )
    text = path.read_text()
    assert "sk-secret" not in text
    manifest = json.loads(text)
    assert manifest["config"]["wandb"]["api_key"] == "***"
    assert manifest["dataset_hash"] == "sha256:x" and manifest["metrics"] == {"a": 1}
    libraries = {"python", "torch", "ray", "transformers", "peft", "deepspeed", "trl", "torch_cuda"}
    assert libraries <= set(manifest["libraries"])
    assert set(manifest["code"]) == {"sha", "dirty", "source"}
    hardware = manifest["hardware"]["driver"]
    assert hardware["cpu_count"] == os.cpu_count() and hardware["memory_gb"] > 0
    assert hardware["gpu_count"] == len(hardware["gpus"])


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "apiKey",
        "APIKey",
        "api-key",
        "HF_TOKEN",
        "hf_token",
        "auth-token",
        "accessToken",
        "aws_secret_access_key",
        "AWS_SECRET_ACCESS_KEY",
        "secretAccessKey",
        "db_password",
        "credentials",
        "access_key_id",
        "token",
    ],
)
def test_secret_looking_keys_are_masked(key):
    assert redact({"x": [{key: "value"}]}) == {"x": [{key: "***"}]}
    assert redact({key: {"nested": "dict"}}) == {key: "***"}  # a whole secret section


@pytest.mark.parametrize(
    "key", ["max_new_tokens", "tokenizer", "tokenizer_name", "num_tokens", "keep_last", "key", "lr"]
)
def test_look_alike_keys_are_kept(key):
    assert redact({"eval": {key: 32}}) == {"eval": {key: 32}}


def test_a_shipped_config_is_recorded_unchanged():
    cfg = load_config(REPO / "configs" / "quickstart.yaml").model_dump()
    assert redact(cfg) == cfg
    assert redact(cfg)["eval"]["max_new_tokens"] == 4


def test_falsy_secrets_and_non_dict_values_pass_through():
    assert redact({"token": None, "api_key": 0, "secret": []}) == {
        "token": None,
        "api_key": 0,
        "secret": [],
    }
    assert redact([1, "token", ("a",)]) == [1, "token", ("a",)]
    assert redact("password") == "password"


def test_manifest_code_state_is_this_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    manifest = write_run_manifest(tmp_path / "run.json", config={})
    assert manifest["code"]["sha"] == head and len(head) == 40
    assert isinstance(manifest["code"]["dirty"], bool)
    assert json.loads((tmp_path / "run.json").read_text()) == manifest
    assert manifest["libraries"]["python"] == platform.python_version()
    assert manifest["libraries"]["torch"] == importlib.metadata.version("torch")
    assert datetime.fromisoformat(manifest["written_at"]).tzinfo is not None


def test_code_state_outside_a_repository_is_null(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYFT_GIT_SHA", raising=False)
    assert git_state(tmp_path) == {"sha": None, "dirty": None, "source": None}
    assert write_run_manifest(tmp_path / "run.json")["config"] == {}


def test_code_shipped_without_git_takes_its_commit_from_the_submitter(tmp_path, monkeypatch):
    """`ray job submit --working-dir` uploads no .git: the submitter passes the commit along."""
    monkeypatch.setenv("RAYFT_GIT_SHA", "0123abcd" * 5)
    monkeypatch.setenv("RAYFT_GIT_DIRTY", "false")
    assert git_state(tmp_path) == {"sha": "0123abcd" * 5, "dirty": False, "source": "env"}
    monkeypatch.setenv("RAYFT_GIT_DIRTY", "maybe")
    assert git_state(tmp_path)["dirty"] is None  # unknown, not guessed
    assert git_state(REPO)["source"] == "git"  # a checkout's own state wins


def test_code_inside_another_repository_is_not_that_repositorys_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYFT_GIT_SHA", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "home"], check=True)
    (tmp_path / "job-copy").mkdir()  # e.g. an unpacked working_dir under a home kept in git
    assert git_state(tmp_path / "job-copy") == {"sha": None, "dirty": None, "source": None}
    assert git_state(tmp_path)["source"] == "git"


def test_code_state_describes_the_code_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no repository here
    manifest = write_run_manifest(tmp_path / "run.json", config={})
    assert manifest["code"]["sha"] == git_state(REPO)["sha"] and manifest["code"]["source"] == "git"


def test_hardware_is_this_machine():
    info = hardware()
    assert info["cpu_count"] == os.cpu_count()
    assert info["memory_gb"] == pytest.approx(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, abs=0.1
    )
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert info["cpu_model"] and info["cpu_model"] in cpuinfo
    assert info["gpu_count"] == len(info["gpus"])
    if not shutil.which("nvidia-smi"):
        assert info["gpus"] == []


def test_credentials_in_urls_are_masked():
    out = redact({"tracking_uri": "https://bob:hunter2@mlflow.example.com/x", "s3": "s3://b/k@v"})
    assert out == {"tracking_uri": "https://***@mlflow.example.com/x", "s3": "s3://b/k@v"}
    assert redact(["http://tok3n@host:5000"]) == ["http://***@host:5000"]


def test_scrub_masks_secret_environment_values_and_url_credentials(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "canary-wandb-Zz11")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "canary-pw-Yy22")
    monkeypatch.setenv("HOME_DIRECTORY_NAME", "not-a-secret-Xx33")
    text = scrub(
        "login canary-wandb-Zz11 failed for https://u:canary-pw-Yy22@h/ (not-a-secret-Xx33)"
    )
    assert text == "login *** failed for https://***@h/ (not-a-secret-Xx33)"
