"""Typed settings of the serving app: the `args` of `serve run serve.app:build_app` or of an
application in configs/serve.yaml. Checked when the app is built, before a replica starts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.names import is_valid_name


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The model every adapter runs on: hub id, local directory or s3://bucket/prefix.
    base_model: str = Field(min_length=1)
    # The `model` id that selects the bare base model; adapters of that name are shadowed.
    base_model_id: str = "base"
    # Adapters record the base they were trained on (adapter_config base_model_name_or_path);
    # it must end in the same name as base_model or one of these (e.g. a hub id for a local copy).
    # Set check_base_name false to rely on the weight-shape check alone.
    base_model_aliases: list[str] = []
    check_base_name: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    registry: str | None = None  # local directory or s3://bucket/prefix
    adapters: dict[str, str] = {}  # plain adapter directories: {name: path}
    alias_ttl_s: float = Field(1.0, ge=0, le=60)  # how soon an alias move is served
    adapter_download_dir: str | None = None  # where s3 adapters are copied

    tenants: str | None = None  # tenants YAML (serve/tenants.py)
    allow_unauthenticated: bool = False  # only for local experiments: no keys, no limits
    # Tenant limits held by one Ray actor for all replicas (serve/limits.py); false: per replica.
    shared_rate_limits: bool = True

    # Adapter slots on the model, per replica. A slot costs rank x (in + out) per targeted layer;
    # at least max_batch_size, a batch never has to be split into rounds of fewer adapters.
    max_loaded_adapters: int = Field(16, ge=1)
    max_cpu_adapters: int = Field(64, ge=0)  # evicted adapters kept in RAM, per replica
    max_lora_rank: int = Field(64, ge=1)

    # single: one deployment, each replica holds the model. routed: a light HTTP ingress and a
    # ModelServer deployment whose requests go to replicas already holding their adapter.
    layout: Literal["single", "routed"] = "single"
    model_replicas: int | None = Field(None, ge=1)  # routed: ModelServer replicas (or autoscaling)
    ingress_cpus: float = Field(0.5, ge=0)  # routed: CPUs of an ingress replica (tokenizing)
    ingress_replicas: int = Field(1, ge=1)  # routed: HTTP ingress replicas
    ingress_max_ongoing_requests: int = Field(2048, ge=1)  # routed: then 503 from the ingress
    # routed: how often model replicas report the adapters they hold to the router, and how many
    # requests longer a holder's queue may be than the shortest before others are preferred.
    routing_stats_period_s: float = Field(1.0, gt=0, le=60)
    routing_imbalance: int = Field(16, ge=0)

    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)
    # Per model replica: requests running or batching; batches need >= max_batch_size.
    max_ongoing_requests: int = Field(64, ge=1)
    # Requests waiting beyond those (single: per replica; routed: per ingress replica's handle);
    # more is a 503 with Retry-After. -1: no limit.
    max_queued_requests: int = Field(512, ge=-1)

    context_window: int | None = Field(None, ge=16)  # default: the model's own
    default_max_tokens: int = Field(256, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    expose_metrics: bool = True  # GET /metrics (this replica's counters), without a key

    @model_validator(mode="after")
    def _check(self):
        if self.tenants is None and not self.allow_unauthenticated:
            raise ValueError(
                "tenants: give a tenants file (see configs/serve-tenants.example.yaml), or set "
                "allow_unauthenticated=true for a local experiment"
            )
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                f"max_batch_size ({self.max_batch_size}): Serve never batches more requests than "
                "a replica may hold"
            )
        bad = [n for n in [*self.adapters, self.base_model_id] if not is_valid_name(n)]
        if bad:
            raise ValueError(f"invalid model names {bad}: use [a-z0-9][a-z0-9-_.]{{0,62}}")
        return self
