"""cluster.yaml passes Ray's own cluster-config validator and keeps the promises its comments make."""

from __future__ import annotations

import copy
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
