"""engine: vllm under faults and load, on a real local Ray: a model replica killed mid-stream
gives the client an OpenAI-shaped error (not a hang) and later requests succeed; sustained load
raises the model replicas from 1 to 2 (Serve's queue-depth autoscaling) and idleness brings them
back to 1. Slow: each new vLLM replica takes tens of seconds to start on 2 CPUs."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import ray
from ray import serve

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
            "downscale_delay_s": 5,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
    }
    serve.run(build_app(settings), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def running_replicas() -> int:
    from ray.serve._private.common import ReplicaState

    status = serve.status().applications[APP].deployments[DEPLOYMENT]
    return status.replica_states.get(ReplicaState.RUNNING, 0)


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


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error_and_later_requests_succeed(app):
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    [actor] = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if DEPLOYMENT in a["name"] and APP in a["name"]
    ]
    replica = ray.get_actor(actor, namespace="serve")
    lines = []
    with httpx.stream("POST", f"{app}/v1/chat/completions", json=long_body(True), timeout=300) as r:
        assert r.status_code == 200
        events = r.iter_lines()
        for line in events:
            lines.append(line)
            if '"content": "' in line and '"content": ""' not in line:
                break  # a generated token: the request is in the engine
        # Frozen in the engine (vLLM's pause, mode keep), so that the stream is provably
        # unfinished when the replica dies, however fast the machine generates.
        handle.pause.remote(mode="keep").result(timeout_s=60)
        ray.kill(replica, no_restart=False)
        lines += list(events)  # must end, not hang (httpx's timeout would fail the test)
    data = [json.loads(x[len("data: ") :]) for x in lines if x.startswith("data: {")]
    assert "data: [DONE]" not in lines
    assert data[-1]["error"]["message"] == "generation failed", data[-1]
    assert data[-1]["error"]["type"] == "server_error"

    def answers() -> bool:
        body = {**long_body(False), "max_tokens": 4}
        try:
            r = httpx.post(f"{app}/v1/chat/completions", json=body, timeout=60)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

    wait_for(answers, 600, "a request to succeed on the restarted replica")


def test_sustained_load_adds_a_model_replica_and_idleness_removes_it(app):
    wait_for(lambda: running_replicas() == 1, 600, "one running model replica")
    stop = threading.Event()
    failures = []

    def load():
        with httpx.Client(timeout=300) as c:
            while not stop.is_set():
                r = c.post(
                    f"{app}/v1/chat/completions", json={**long_body(False), "max_tokens": 64}
                )
                if r.status_code != 200:
                    failures.append(r.text)

    workers = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: running_replicas() == 2, 600, "a second model replica under load")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=300)
    assert failures == []
    wait_for(lambda: running_replicas() == 1, 600, "back to one model replica when idle")
