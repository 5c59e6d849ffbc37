"""Prometheus counters of one replica: requests and tokens per model, adapter cache events.

Each replica keeps its own registry and serves it on GET /metrics; with several replicas, each
one's /metrics shows that replica (scrape replicas directly, or sum on the Prometheus side).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rayft_serve_requests",
            "Requests by model and HTTP status; model is '-' when the "
            "request named no servable model",
            ["model", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "rayft_serve_tokens",
            "Tokens processed by model",
            ["model", "kind"],
            registry=self.registry,
        )
        self.cache_events = Counter(
            "rayft_serve_adapter_cache_events",
            "Adapter cache events: hit (on the model), cpu_hit (in RAM), miss, storage_read, "
            "load (onto the model), eviction (model to RAM), cpu_eviction (dropped from RAM)",
            ["event"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "rayft_serve_batch_size",
            "Rows per generate call",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.batch_adapters = Histogram(
            "rayft_serve_batch_adapters",
            "Distinct adapters per generate call",
            registry=self.registry,
            buckets=(0, 1, 2, 4, 8, 16, 32),
        )

    def cache_event(self, event: str) -> None:
        self.cache_events.labels(event).inc()

    def request(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt_tokens)
        self.tokens.labels(model, "completion").inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
