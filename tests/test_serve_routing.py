"""The `routed` layout on a real local Ray: an ingress and two ModelServer replicas. Requests for
an adapter go to the replica that holds it, a replica still batches across adapters, a replica
killed under load costs no request, and a full queue is a 503 in the OpenAI shape."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import ray
import yaml
from ray import serve
from transformers import AutoModelForCausalLM

from serve.app import build_app
from serve.limits import limiter_name
from serve.tenants import hash_key
from serve.testing import make_random_adapter
from tests.helpers import start_local_serve
from tests.test_serve_adapters import publish
from tests.test_serve_app import offline

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

V1 = "a1b2c3d4e5f6"
ADAPTERS = ["red", "green", "blue", "gray"]
MESSAGES = [{"role": "user", "content": "How was the delivery?"}]
OPEN, METERED = "sk-test-open-key-0001", "sk-test-metered-key-0002"


@pytest.fixture(scope="module")
def routed(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-routing")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for seed, name in enumerate(ADAPTERS, start=20):
        made = make_random_adapter(tiny_model_dir, tmp / "src" / name, seed=seed, base_model=base)
        publish(tmp / "registry", name, V1, made)
    tenants = tmp / "tenants.yaml"
    tenant_list = [
        {"name": "open", "key_sha256": hash_key(OPEN), "adapters": ["*"]},
        {
            "name": "metered",
            "key_sha256": hash_key(METERED),
            "adapters": ["*"],
            "requests_per_minute": 3,
        },
    ]
    tenants.write_text(yaml.safe_dump({"tenants": tenant_list}))
    port = start_local_serve()
    serve.run(
        build_app(
            {
                "base_model": str(tiny_model_dir),
                "registry": str(tmp / "registry"),
                "tenants": str(tenants),
                "engine": "hf",
                "layout": "routed",
                "model_replicas": 2,
                "ingress_replicas": 2,
                "ingress_cpus": 0,
                "context_window": 256,
                "max_loaded_adapters": 4,
                "max_batch_size": 8,
                "batch_wait_timeout_s": 0.05,
                "max_ongoing_requests": 8,
                "max_queued_requests": 16,
                "routing_stats_period_s": 0.2,
            }
        ),
        name="routed",
        route_prefix="/",
    )
    yield {"url": f"http://127.0.0.1:{port}", "registry": tmp / "registry", "tenants": tenants}
    serve.shutdown()


def chat(url, model, max_tokens=8, key=OPEN, status=200):
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=120,
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0},
    )
    assert status is None or r.status_code == status, r.text
    return r


async def chat_all(url, models, max_tokens=8):
    headers = {"Authorization": f"Bearer {OPEN}"}
    async with httpx.AsyncClient(timeout=120, headers=headers) as c:
        return await asyncio.gather(
            *(
                c.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "model": m,
                        "messages": MESSAGES,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    },
                )
                for m in models
            )
        )


def test_requests_go_to_the_replica_that_holds_their_adapter(routed):
    url = routed["url"]
    first = chat(url, "red").headers["x-model-replica"]
    # Right after the load, through either ingress replica: the one that sent it remembers, the
    # other has not heard yet (stats every 0.2 s) and sends it to red's home, the same replica.
    assert {chat(url, "red").headers["x-model-replica"] for _ in range(5)} == {first}
    # Past the router's own memory of where it sent "red": the replica's reported adapters
    # (record_routing_stats, polled every 0.2 s) still lead there.
    time.sleep(2.6)
    assert {chat(url, "red").headers["x-model-replica"] for _ in range(3)} == {first}


def test_a_replica_batches_requests_for_several_adapters_together(
    routed, tiny_model_dir, tokenizer
):
    url = routed["url"]
    models = ["red", "green", "blue", "base"] * 2
    responses = asyncio.run(chat_all(url, models))
    assert all(r.status_code == 200 for r in responses), [
        (r.status_code, r.text) for r in responses if r.status_code != 200
    ]
    for model, r in zip(models, responses, strict=True):
        adapter = None if model == "base" else routed["registry"] / model / V1
        assert r.json()["choices"][0]["message"]["content"] == offline(
            tiny_model_dir, tokenizer, adapter, max_tokens=8
        )
    batches = [dict(p.split("=") for p in r.headers["x-batch"].split("; ")) for r in responses]
    assert max(int(b["adapters"]) for b in batches) >= 2, batches  # one batch, several adapters


def test_streaming_through_the_model_replica(routed):
    url, headers = routed["url"], {"Authorization": f"Bearer {OPEN}"}
    whole = chat(url, "blue", max_tokens=10).json()["choices"][0]["message"]["content"]
    body = {
        "model": "blue",
        "messages": MESSAGES,
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers["x-model-replica"]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole and chunks[-1]["usage"]["completion_tokens"] == 10


def first_token(sse_line: str) -> bool:
    """A streamed chunk that carries generated text (the first chunk only names the role)."""
    if not sse_line.startswith("data: {"):
        return False
    choices = json.loads(sse_line[len("data: ") :]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def test_a_replica_killed_under_load_costs_no_request(routed, tiny_model_dir, tokenizer):
    url = routed["url"]
    holder = chat(url, "gray").headers["x-model-replica"]
    want = offline(tiny_model_dir, tokenizer, routed["registry"] / "gray" / V1, max_tokens=120)

    [replica] = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].endswith(holder) and "ModelServer" in a["name"]
    ]
    holder_actor = ray.get_actor(replica, namespace="serve")
    body = {"model": "gray", "messages": MESSAGES, "max_tokens": 120, "temperature": 0}

    async def holder_busy_with(requests: int, burst: list[asyncio.Future]) -> None:
        """Until the holder holds `requests` unanswered requests (Serve counts them on a thread of
        its own, which generation does not block); generous: a busy machine is slow to route."""
        deadline = time.monotonic() + 60
        while True:
            held = await holder_actor.get_num_ongoing_requests.remote()
            assert not any(f.done() for f in burst), "a request was answered before the kill"
            if held >= requests:
                return
            assert time.monotonic() < deadline, f"the adapter's holder held {held} requests"
            await asyncio.sleep(0.01)

    async def kill_while_running():
        # Killed on events, not a timer: a streamed request goes first and the six after it. Its
        # first generated token means the holder generates; then the holder is seen holding six
        # unanswered requests (the six, or five of them and the stream), and none is answered.
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {OPEN}"}) as c:
            post = f"{url}/v1/chat/completions"
            async with c.stream("POST", post, json={**body, "stream": True}) as sentinel:
                assert sentinel.headers["x-model-replica"] == holder
                burst = [asyncio.ensure_future(c.post(post, json=body)) for _ in range(6)]
                async for line in sentinel.aiter_lines():
                    if first_token(line):
                        break
                await holder_busy_with(6, burst)
                ray.kill(holder_actor, no_restart=True)
            return await asyncio.gather(*burst)

    responses = asyncio.run(kill_while_running())
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {want}
    replicas = {r.headers["x-model-replica"] for r in responses}
    assert replicas and holder not in replicas  # all were sent again, to the other replica
    assert chat(url, "gray").headers["x-model-replica"] != holder


def test_full_model_queues_are_503_in_openai_shape(routed):
    # 2 replicas x 8 running + 16 waiting at the ingress's handle: 64 at once overflow.
    responses = asyncio.run(chat_all(routed["url"], ["base"] * 64, max_tokens=64))
    statuses = {r.status_code for r in responses}
    assert statuses == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert int(r.headers["retry-after"]) >= 1


def test_tenant_limits_hold_across_ingress_replicas(routed):
    # Two ingress replicas, 3 requests a minute: 3 answers in all, not 3 per replica.
    statuses = [
        chat(routed["url"], "base", max_tokens=1, key=METERED, status=None).status_code
        for _ in range(9)
    ]
    assert sorted(statuses) == [200] * 3 + [429] * 6, statuses

    # The limiter actor gone: replicas limit on their own (and start a new actor) meanwhile.
    name = limiter_name("routed", routed["tenants"])

    def limiter():
        [namespace] = [
            a["namespace"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"] == name
        ]
        return ray.get_actor(name, namespace=namespace)

    ray.kill(limiter())
    deadline = time.time() + 120  # generous: on a busy machine an actor takes seconds to start
    while True:
        chat(routed["url"], "base", max_tokens=1)  # admitted all the same
        try:  # a replica that found the actor gone has started a new one
            ray.get(limiter().admit.remote("open", 1), timeout=5)
            break
        except Exception:
            assert time.time() < deadline, "no new rate-limit actor"
