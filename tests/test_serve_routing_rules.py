"""AdapterAffinityRouter's ranking, without Ray: replicas and requests are plain stand-ins with
the fields the router reads (the routed layout itself runs in tests/test_serve_routing.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from ray.serve._private.common import DeploymentID
from ray.serve.request_router import ReplicaID

from serve.routing import AdapterAffinityRouter, home_of

MODEL = DeploymentID(name="ModelServer", app_name="routed")


def replica(name, **stats):
    return SimpleNamespace(replica_id=ReplicaID(name, MODEL), routing_stats=stats)


def router(queues=None):
    # Serve's constructor wants a live deployment; the ranking needs only this state.
    r = AdapterAffinityRouter.__new__(AdapterAffinityRouter)
    r.initialize_state(imbalance=4, memory_s=2.2)
    r._replica_queue_len_cache = dict(queues or {})  # by replica id, as Serve's cache
    return r


def ranks(r, replicas, adapter):
    request = SimpleNamespace(
        args=[SimpleNamespace(adapter_key=adapter)], routing_context=SimpleNamespace()
    )
    return [
        [x.replica_id.unique_id for x in rank]
        for rank in asyncio.run(r.choose_replicas(replicas, request))
    ]


def test_a_cold_adapter_gets_the_same_home_from_every_router():
    replicas = [replica(n) for n in ("a1", "b2", "c3")]
    # Two ingress replicas = two routers that know nothing of each other's sends.
    for adapter in ("red", "green", "blue", "gray", "t-0017"):
        first, other = ranks(router(), replicas, adapter), ranks(router(), replicas[::-1], adapter)
        assert first[0] == other[0] == [home_of(adapter, ["a1", "b2", "c3"])]
        assert sorted(first[1]) == sorted(other[1]) == sorted({"a1", "b2", "c3"} - set(first[0]))


def test_homes_spread_over_replicas_and_only_a_lost_replicas_keys_move():
    ids = [f"r{i}" for i in range(4)]
    keys = [f"adapter-{i}" for i in range(400)]
    homes = {k: home_of(k, ids) for k in keys}
    assert min(Counter(homes.values()).values()) > 60  # ~100 each
    after = {k: home_of(k, ids[1:]) for k in keys}
    assert all(after[k] == homes[k] for k in keys if homes[k] != "r0")


def test_a_reported_holder_comes_before_the_home_and_a_busy_one_is_passed_over():
    a, b = replica("a1"), replica("b2")
    home = home_of("red", ["a1", "b2"])
    holder = a if home == "b2" else b
    holder.routing_stats = {"ram": ["red"]}
    assert ranks(router(), [a, b], "red")[0] == [holder.replica_id.unique_id]
    # 5 requests longer than the shortest queue (imbalance 4): the home takes it instead.
    assert ranks(router({holder.replica_id: 5}), [a, b], "red")[0] == [home]


def test_a_replica_this_router_just_sent_to_counts_as_holding_it():
    a, b = replica("a1"), replica("b2")
    r = router()
    not_home = "a1" if home_of("red", ["a1", "b2"]) == "b2" else "b2"
    request = SimpleNamespace(args=[SimpleNamespace(adapter_key="red")])
    r.on_request_routed(request, (a if not_home == "a1" else b).replica_id, None)
    assert ranks(r, [a, b], "red")[0] == [not_home]
