"""Requests for an adapter go to a model replica that already holds it (the `routed` layout).

Serve's multiplexed-model routing would do this, but Serve also splits every `@serve.batch` batch
by multiplexed model id, which would end mixed-adapter batches. This router reads the adapter
from the request itself (the `Job` the ingress passes to ModelServer) and ranks replicas:

1. replicas holding the adapter on the model or in RAM, as they report it through
   `ModelServer.record_routing_stats` (polled by Serve's controller every
   `routing_stats_period_s`), or to which this router sent the adapter in the last
   `routing_stats_period_s` + 2 s (a fresh load is known here at once, before the next poll);
2. when no replica is known to hold it: the adapter's home, the replica that rendezvous hashing
   of (adapter, replica id) picks. Every router computes the same home, so requests for a cold
   adapter arriving through different ingress replicas load it on one model replica, not on
   each, before the holder's next report reaches the other routers;
3. every other replica.

Within a rank Serve takes the replica with the shortest queue that has room. A holder whose
queue is `imbalance` requests longer than the shortest queue is not preferred: a popular adapter
spreads over replicas instead of queueing on one. Base-model requests go to the two-choice draw.
"""

from __future__ import annotations

import hashlib
import random
import time

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


def adapter_key_of(request: PendingRequest | None) -> str | None:
    """The engine key of the adapter a ModelServer call is for; None for the base or others."""
    if request is None or not request.args:
        return None
    return getattr(request.args[0], "adapter_key", None)


def home_of(key: str, replica_ids: list[str]) -> str:
    """The replica id rendezvous hashing gives `key`: the same in every process (unlike `hash`),
    and when a replica leaves only the keys whose home it was move."""
    return max(replica_ids, key=lambda r: hashlib.blake2b(f"{key}\0{r}".encode()).digest())


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 16, memory_s: float = 3.0):
        self.imbalance = imbalance
        self.memory_s = memory_s  # how long a send of ours counts as "holds it"
        self.sent: dict[str, dict[ReplicaID, float]] = {}  # adapter key -> replica -> when

    def holders(self, key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
        now = time.monotonic()
        recent = {r for r, t in self.sent.get(key, {}).items() if now - t < self.memory_s}
        found = []
        for r in replicas:
            stats = r.routing_stats or {}
            if (
                r.replica_id in recent
                or key in stats.get("loaded", ())
                or key in stats.get("ram", ())
            ):
                found.append(r)
        return found

    def home(self, key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
        home_id = home_of(key, [r.replica_id.unique_id for r in replicas])
        return [r for r in replicas if r.replica_id.unique_id == home_id]

    def queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Back off between rounds when every replica is full, instead of spinning.
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        key = adapter_key_of(pending_request)
        if key is not None:
            shortest = min(self.queue_len(r) for r in candidate_replicas)

            def not_too_busy(replicas: list[RunningReplica]) -> list[RunningReplica]:
                return [r for r in replicas if self.queue_len(r) - shortest <= self.imbalance]

            warm = not_too_busy(self.holders(key, candidate_replicas)) or not_too_busy(
                self.home(key, candidate_replicas)
            )
            if warm:
                rest = [r for r in candidate_replicas if r not in warm]
                return [warm, rest] if rest else [warm]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        key = adapter_key_of(pending_request)
        if key is not None:
            self.sent.setdefault(key, {})[replica_id] = time.monotonic()

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        for replicas in self.sent.values():
            replicas.pop(replica_id, None)
