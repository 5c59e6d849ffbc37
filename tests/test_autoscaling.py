"""Scale from zero, for real on one machine: Ray's fake multi-node autoscaler launches a worker node
for a training job that needs a resource only workers have, and removes it once idle.

The head is `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=FILE`, stopped through its
process group and the processes of its session directory (never `ray stop`, which stops every Ray
process on the machine).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
import yaml

from jobs.config import load_config
from jobs.finetune import run_job
from tests.helpers import free_port, start_ray_head, stop_ray_head, wait_for_port

pytestmark = pytest.mark.integration


def alive_nodes() -> int:
    return sum(n["Alive"] for n in ray.nodes())


@pytest.fixture
def fake_cluster(tmp_path):
    ip = ray.util.get_node_ip_address()
    port = free_port()
    config = {
        "cluster_name": "fake",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # the real cluster.yaml keeps idle nodes 10 minutes
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"{ip}:{port}",  # else new nodes dial the default port 6379
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,  # nothing to install: the nodes are processes here
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            # the stand-in for a GPU node: only it has a `gpu_slot`
            "gpu_worker": {
                "resources": {"CPU": 1, "gpu_slot": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
    }
    config_file = tmp_path / "fake_cluster.yaml"
    config_file.write_text(yaml.safe_dump(config))
    fake = {
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",
    }
    head, session_dir, _ = start_ray_head(
        "--num-cpus=1",
        f"--autoscaling-config={config_file}",
        port=port,
        dashboard_port=free_port(),
        env=fake,
    )
    wait_for_port(port, timeout=60)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.shutdown()  # the session's local Ray: this module's driver joins the autoscaling head
    ray.init(address=f"{ip}:{port}")
    yield
    ray.shutdown()
    os.environ.pop("RAY_AUTH_MODE", None)
    stop_ray_head(head, session_dir)


def test_a_job_scales_a_worker_node_up_from_zero_and_down_when_idle(
    fake_cluster, tiny_model_dir, tmp_path
):
    assert alive_nodes() == 1  # the head only: no worker node runs before a job asks for one
    assert "gpu_slot" not in ray.cluster_resources()
    cfg = load_config(
        "configs/quickstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={tmp_path}",
            "run.name=scaled",
            "train.max_steps=3",
            "eval.every_steps=null",
            "eval.early_stopping_patience=null",
            "checkpoint.every_steps=null",
            "eval.task_metric=none",
            "scaling.cpus_per_worker=1",
            "scaling.resources_per_worker={gpu_slot: 1}",
        ],
    )
    node_up_at = []
    start = time.time()

    def watch_for_the_node():
        while not node_up_at and time.time() - start < 120:
            if alive_nodes() == 2:
                node_up_at.append(time.time() - start)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_for_the_node, daemon=True)
    watcher.start()
    summary = run_job(cfg)
    finished = time.time()
    watcher.join()
    assert summary["status"] == "completed"
    assert node_up_at and alive_nodes() == 2  # the job ran on a node the autoscaler launched for it

    deadline = time.time() + 120
    while alive_nodes() > 1:
        assert time.time() < deadline, "the idle worker node was not removed"
        time.sleep(0.5)
    print(
        f"\nworker node alive {node_up_at[0]:.1f}s after the job started; job took {finished - start:.1f}s; "
        f"node removed {time.time() - finished:.1f}s after the job ended (idle_timeout_minutes 0.1)"
    )
