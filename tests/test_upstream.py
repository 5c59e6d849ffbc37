"""The private APIs of TRL, DeepSpeed and datasketch behind core/upstream/: a job config that will
reach one refuses a version outside the supported range when it loads, naming the library, the
installed version, the range and the field; and each private name exists in the installed version."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from core import upstream
from core.config import ConfigError
from jobs.config import load_config
from jobs.data.prepare import load_prepare_config
from tests.helpers import REPO

UNSUPPORTED = {"trl": "0.9.6", "deepspeed": "0.14.0", "datasketch": "1.5.9"}


@pytest.fixture
def unsupported(monkeypatch):
    """`core.upstream.installed` answers an unsupported trl, deepspeed and datasketch."""
    real = upstream.installed
    monkeypatch.setattr(upstream, "installed", lambda d: UNSUPPORTED.get(d) or real(d))


def refusal(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def assert_names(message: str, library: str, field: str) -> None:
    assert f"{library} {UNSUPPORTED[library]} is installed" in message, message
    assert f"{library}{upstream.SUPPORTED[library]}" in message, message
    assert field in message, message


def test_the_installed_versions_are_supported():
    upstream.require("trl", "deepspeed", "datasketch")


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_a_dpo_or_grpo_config_refuses_an_unsupported_trl(unsupported, method):
    message = refusal(REPO / f"configs/{method}.yaml")
    assert_names(message, "trl", f"train.method: {method}")
    assert f"{method}.yaml" in message  # the file that needed it


def test_a_deepspeed_config_refuses_an_unsupported_deepspeed(unsupported):
    overrides = ["train.strategy=deepspeed", "data.dedup.near=false"]
    message = refusal(REPO / "configs/quickstart.yaml", overrides)
    assert_names(message, "deepspeed", "train.strategy: deepspeed")


def test_near_dedup_refuses_an_unsupported_datasketch(unsupported):
    message = refusal(REPO / "configs/quickstart.yaml")
    assert_names(message, "datasketch", "data.dedup.near: true")
    with pytest.raises(ConfigError) as e:  # python -m jobs.prepare checks it as well
        load_prepare_config(REPO / "tests/fixtures/messy/prepare.yaml")
    assert_names(str(e.value), "datasketch", "data.dedup.near: true")


def test_a_config_that_reaches_no_private_api_checks_nothing(unsupported):
    # SFT with ddp and no near-duplicate removal, or on a set prepared before
    load_config(REPO / "configs/quickstart.yaml", ["data.dedup.near=false"])
    load_config(REPO / "configs/quickstart.yaml", ["data.prepared=prepared/quickstart"])


def test_dpo_does_not_check_datasketch(monkeypatch):
    # DPO's pairs are not deduplicated: data.dedup.near (on by default) does not reach datasketch
    real = upstream.installed
    monkeypatch.setattr(upstream, "installed", lambda d: "1.5.9" if d == "datasketch" else real(d))
    load_config(REPO / "configs/dpo.yaml")


def defines(package_name: str, path: str, name: str) -> bool:
    """Whether the installed package's source file defines `name` (read, not imported: importing
    DeepSpeed or TRL's trainers starts processes and takes seconds)."""
    package = Path(importlib.util.find_spec(package_name).origin).parent
    return f"def {name}(" in (package / path).read_text()


def test_the_private_names_exist_in_the_installed_versions():
    from datasketch import MinHashLSH

    from core.upstream.datasketch import lsh_bands

    assert defines("trl", "trainer/dpo_trainer.py", "_compute_loss")
    assert defines("trl", "trainer/grpo_trainer.py", "_compute_loss")
    assert defines("deepspeed", "runtime/engine.py", "_zero3_consolidated_16bit_state_dict")
    lsh = MinHashLSH(threshold=0.8, num_perm=128)  # the banding datasketch's own index picks
    assert lsh_bands(0.8, 128) == (lsh.b, lsh.r)
