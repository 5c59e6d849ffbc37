"""Joining or starting Ray: the one place that calls ray.init for the product's processes."""

from __future__ import annotations

import os
import socket


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster named by `address` or RAY_ADDRESS (as inside `ray job submit`), else start one here."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        start_local_ray(num_cpus)


def start_local_ray(num_cpus: int | None = None) -> None:
    """A fresh single-node Ray for this process.

    - address="local": a bare ray.init() would follow a stale /tmp/ray/ray_current_cluster into
      a dead cluster.
    - The dashboard stays on (bound to 127.0.0.1): it serves the state API, without which Ray
      Train's placement-group cleaner cannot see a dead controller (it logs a warning every few
      seconds) and would leave that run's resources held.
    - Metrics collection is off: on a 2-core machine its periodic sampling competes with training.
    - Ray starts workers at niceness 15 so that its daemons stay responsive; on a small machine
      that costs the training worker ~12% of its throughput (benchmarks/README.md), so the
      embedded instance runs them at normal priority.
    - Workers are told where this cluster's dashboard is (RAY_API_SERVER_ADDRESS). Without it,
      the placement-group cleaner's state-API client looks for "the" local Ray, fails with
      "Found multiple active Ray instances" whenever another Ray runs on the machine (a test
      suite, a second job), and the placement groups of Train runs that Tune stopped are never
      removed: later trials wait forever for CPUs (a sweep hangs).
    """
    import ray

    port = _free_port()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        _system_config={"worker_niceness": 0, "enable_metrics_collection": False},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
