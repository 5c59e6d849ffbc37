"""cluster.yaml passes Ray's own cluster-config validator and keeps the promises its comments make."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = yaml.safe_load(Path("cluster.yaml").read_text())


def validated(config: dict) -> dict:
    prepared = prepare_config(
        copy.deepcopy(config)
    )  # merges the provider's defaults, as `ray up` does
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validator():
    prepared = validated(CLUSTER)
    assert prepared["head_node_type"] == "head"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(idle_timout_minutes=3),  # a typo at the top level
        lambda c: c["available_node_types"]["gpu_spot"]["resources"].update(GPU="one"),
        lambda c: c["available_node_types"]["gpu_spot"].pop("node_config"),
    ],
)
def test_the_validator_catches_typos(mutate):
    broken = copy.deepcopy(CLUSTER)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validated(broken)


def test_workers_scale_from_zero_and_the_head_trains_nothing():
    types = CLUSTER["available_node_types"]
    workers = {name: t for name, t in types.items() if name != CLUSTER["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 for t in workers.values())
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert types["head"]["resources"] == {"CPU": 0}
    spot = [
        t
        for t in workers.values()
        if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    on_demand = [t for t in workers.values() if "InstanceMarketOptions" not in t["node_config"]]
    assert spot and on_demand
    assert max(t["priority"] for t in on_demand) < min(t["priority"] for t in spot)  # spot first


def test_token_auth_everywhere_and_no_public_dashboard():
    head = " ".join(CLUSTER["head_start_ray_commands"])
    worker = " ".join(CLUSTER["worker_start_ray_commands"])
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands
        assert (
            "secretsmanager get-secret-value" in commands
        )  # the token comes from the secret store
    assert "--dashboard-host=127.0.0.1" in head


def test_cluster_runs_the_laptops_ray_version():
    assert CLUSTER["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def test_nodes_set_up_with_the_gpu_extras_or_not_at_all():
    setup = CLUSTER["setup_commands"]
    assert setup == ["bash /home/ray/rayft/cluster/setup_node.sh /home/ray/rayft"]
    script = Path("cluster/setup_node.sh").read_text()
    assert "set -euo pipefail" in script
    # no fallback to an install without the GPU extras
    assert "||" not in "".join(setup) + script
    assert "requirements/gpu.txt" in script


@pytest.mark.integration  # runs the script (against a fake pip)
def test_a_failing_gpu_extra_stops_the_set_up_and_is_named(tmp_path):
    """The script against a fake pip: the project installs, then bitsandbytes fails."""
    repo = tmp_path / "repo"
    (repo / "cluster").mkdir(parents=True)
    (repo / "cluster" / "setup_node.sh").write_text(Path("cluster/setup_node.sh").read_text())
    (repo / "pyproject.toml").write_text(Path("pyproject.toml").read_text())
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = - ]; then exec {sys.executable} "$@"; fi\n'
        f'echo "$@" >> {log}\n'
        '[[ "$*" != *bitsandbytes* ]]\n'
    )
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(repo / "cluster" / "setup_node.sh")],
        env={**os.environ, "PYTHON": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "the GPU extra 'bitsandbytes' failed to install" in done.stderr
    calls = log.read_text().splitlines()
    assert calls[0].endswith(f"-e {repo}")  # the project first
    assert "gpu.txt" in calls[0] and calls[-1].endswith("bitsandbytes")  # then it stopped
