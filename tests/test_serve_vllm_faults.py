"""engine: vllm under load and faults, on a real local Ray, told as one story so that it needs
two vLLM replica starts (each takes tens of seconds on 2 CPUs): load raises the model replicas
from 1 to 2 (Serve's queue-depth autoscaling) and every request in flight completes; once it ends,
idleness brings the autoscaler's target back to 1 and Serve removes the newer replica, which waits
for the stream it holds; that replica killed mid-stream gives the client an OpenAI-shaped error
(not a hang), later requests succeed on the older replica, and no replica starts in its place."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import httpx
import pytest
import ray
from ray import serve
from ray.serve._private.common import ReplicaState

from serve.app import build_app
from serve.vllm_server import DEPLOYMENT
from tests.helpers import start_local_serve, wait_for

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "How was the delivery?"}]
APP = "vllm-faults"


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    port = start_local_serve()
    settings = {
        "engine": "vllm",
        "base_model": str(tiny_model_dir),
        "allow_unauthenticated": True,
        "dtype": "float32",
        "context_window": 512,
        "ingress_cpus": 0,
        "model_autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 2,
            # time to open a stream on the newer replica before idleness removes it
            "downscale_delay_s": 8,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
    }
    serve.run(build_app(settings), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def model_deployment():
    """The VllmServer deployment as Serve's controller sees it: its target number of replicas
    (the autoscaler's decision) and its replicas with their states and actor names."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    return details.applications[APP].deployments[DEPLOYMENT]


def running_replicas() -> list[str]:
    """The running model replicas' actor names, oldest first."""
    replicas = [r for r in model_deployment().replicas if r.state == ReplicaState.RUNNING]
    return [r.actor_name for r in sorted(replicas, key=lambda r: r.start_time_s)]


def ongoing(actor) -> int:
    """Requests in a model replica now (Serve's own count, which its router reads too)."""
    return ray.get(actor.get_num_ongoing_requests.remote(), timeout=30)


def long_body(stream: bool) -> dict:
    # ignore_eos (vLLM's): the answer runs to max_tokens, whatever a random model emits.
    return {
        "model": "base",
        "messages": MESSAGES,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def answers(app: str) -> bool:
    body = {**long_body(False), "max_tokens": 4}
    try:
        r = httpx.post(f"{app}/v1/chat/completions", json=body, timeout=60)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def open_stream(streams: contextlib.ExitStack, app: str) -> tuple[list[str], Iterator[str]]:
    """A streamed request, read up to its first generated token: it is in an engine then."""
    r = streams.enter_context(
        httpx.stream("POST", f"{app}/v1/chat/completions", json=long_body(True), timeout=300)
    )
    assert r.status_code == 200
    lines, events = [], r.iter_lines()
    for line in events:
        lines.append(line)
        if '"content": "' in line and '"content": ""' not in line:
            break
    return lines, events


def test_a_replica_added_under_load_removed_when_idle_and_killed_mid_stream(app):
    # --- load adds a model replica, and every request completes ---------------------------
    [first] = running_replicas()
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    with contextlib.ExitStack() as held:
        # Four requests in the engine, frozen there (vLLM's pause, mode keep): the replica's
        # ongoing count stays above the target of 2 however fast this machine generates, and
        # the new replica starts on CPUs the load leaves alone (under a generating load its
        # start took tens of seconds longer).
        load = [open_stream(held, app) for _ in range(4)]
        handle.broadcast("pause", mode="keep").results(timeout_s=60)
        wait_for(lambda: len(running_replicas()) == 2, 600, "a second model replica under load")
        handle.broadcast("resume").results(timeout_s=60)
        for lines, events in load:
            lines += list(events)
            assert "data: [DONE]" in lines and '"error"' not in "".join(lines), lines[-3:]

    # --- a stream on the newer replica, frozen --------------------------------------------
    [newer] = [name for name in running_replicas() if name != first]
    older, victim = (ray.get_actor(name, namespace="serve") for name in (first, newer))
    wait_for(lambda: not ongoing(older) and not ongoing(victim), 60, "the load's requests to end")
    with contextlib.ExitStack() as streams:
        lines, events = open_stream(streams, app)
        if not ongoing(victim):
            # It runs on the older replica (and goes on there): Serve's router sends the next
            # request to the less busy replica, the newer one.
            lines, events = open_stream(streams, app)
        # Frozen in the engines (vLLM's pause, mode keep, on every replica), so that the stream
        # is provably unfinished when its replica dies, however fast the machine generates.
        handle.broadcast("pause", mode="keep").results(timeout_s=60)
        assert ongoing(victim) == 1, "no stream on the newer replica"

        # --- idleness removes a replica: the newer one, which waits for its stream ------------
        # Two requests at most (the streams) are under the target of 2 per replica. Serve stops
        # the newest replica first and lets its requests finish (for up to 20 s, Serve's
        # graceful_shutdown_timeout_s) before it kills it.
        def newer_stopping() -> bool:
            d = model_deployment()
            running = [r.actor_name for r in d.replicas if r.state == ReplicaState.RUNNING]
            return d.target_num_replicas == 1 and running == [first]

        wait_for(newer_stopping, 120, "the autoscaler to remove the newer replica when idle")

        # --- the newer replica killed mid-stream ----------------------------------------------
        ray.kill(victim, no_restart=False)
        lines += list(events)  # must end, not hang (httpx's timeout would fail the test)
        # The older replica generates again (a broadcast that still reaches the dead one gets
        # its death back).
        resumed = handle.broadcast("resume").results(timeout_s=60, return_exceptions=True)
        assert None in resumed, resumed
    data = [json.loads(x[len("data: ") :]) for x in lines if x.startswith("data: {")]
    assert "data: [DONE]" not in lines
    assert data[-1]["error"]["message"] == "generation failed", data[-1]
    assert data[-1]["error"]["type"] == "server_error"
    wait_for(lambda: answers(app), 600, "a request to succeed after the kill")
    # gone, and none started in its place (the target is 1)
    wait_for(
        lambda: [r.actor_name for r in model_deployment().replicas] == [first],
        120,
        "only the older model replica",
    )
