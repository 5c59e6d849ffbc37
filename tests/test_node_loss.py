"""Two workers spread over two nodes, one node lost mid-run (a spot preemption): the run finishes
on a replacement node from its last checkpoint.

Uses ray.cluster_utils.Cluster: several raylets on this machine, each a real Ray node.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from jobs.config import load_config
from jobs.finetune import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster():
    ray.shutdown()  # the session's local Ray: this test drives a cluster of its own
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1}
    )  # drivers and the Train controller
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def test_training_spread_over_two_nodes_survives_losing_one(cluster, tiny_model_dir, tmp_path):
    """Multi-node: FSDP across two Ray nodes, one worker on each (placement_strategy SPREAD:
    each node could hold both workers, PACK would not put them apart). One node vanishes mid-run
    (a spot preemption); the run finishes on the survivor and a replacement node, from its last
    registered checkpoint, with no step lost or repeated."""
    gpu_like = {"trainer_slot": 2}  # only worker nodes have it, as only GPU nodes have GPUs
    nodes = [cluster.add_node(num_cpus=2, resources=gpu_like) for _ in range(2)]
    cfg = load_config(
        "configs/quickstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={tmp_path}",
            "run.name=spot",
            "train.max_steps=60",
            "train.micro_batch_size=8",
            "checkpoint.every_steps=10",
            "checkpoint.keep_last=2",
            "eval.every_steps=null",
            "eval.early_stopping_patience=null",
            "eval.task_metric=none",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=1",
            "scaling.resources_per_worker={trainer_slot: 1}",
            "scaling.placement_strategy=SPREAD",
            "scaling.max_failures=2",
            "train.strategy=fsdp",
        ],
    )
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_job(cfg)), daemon=True)
    runner.start()

    # Wait until the controller has registered a checkpoint (written on disk is not enough: a
    # worker that dies right after reporting takes its unprocessed report with it).
    snapshot = tmp_path / "spot" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 180
    while not (snapshot.is_file() and json.loads(snapshot.read_text()).get("checkpoint_results")):
        assert time.time() < deadline and runner.is_alive(), "no checkpoint before the node loss"
        time.sleep(0.2)
    # The autoscaler's replacement joins as the spot node vanishes (the notice comes first); were
    # it later, the restarted group could fit on the survivor alone (SPREAD is best effort)
    replacement = cluster.add_node(num_cpus=2, resources=gpu_like)
    cluster.remove_node(nodes[1])  # the spot node vanishes mid-run
    runner.join(timeout=300)

    summary = outcome["summary"]
    assert summary["status"] == "completed"
    assert len(summary["resumed_at_steps"]) == 1 and summary["resumed_at_steps"][0] % 10 == 0
    assert 0 < summary["resumed_at_steps"][0] < 60
    assert [h["step"] for h in summary["loss_history"]] == list(range(1, 61))
    # the last attempt's two workers: one on the survivor, one on the replacement
    assert sorted(summary["worker_nodes"]) == sorted([nodes[0].node_id, replacement.node_id])
