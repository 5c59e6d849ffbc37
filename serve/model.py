"""What holds the model: the base model, the adapter cache and the batcher of one replica.

`ModelWorker` is a plain object. In the `single` layout the HTTP ingress (serve/app.py) holds one
in its own replica; in the `routed` layout each replica of the `ModelServer` deployment holds one,
the ingress calls it through a handle, and serve/routing.py sends each request to a replica that
already holds its adapter. Either way one `@serve.batch` batch mixes requests for any adapters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import serve

from inference.engine import GenerationRequest, GenerationResult, HFEngine, context_window_of
from serve.adapters import AdapterCache, AdapterRef, AdapterRegistry
from serve.config import ServeSettings
from serve.errors import ApiError
from serve.metrics import Metrics
from serve.scheduler import generate_in_groups


@dataclass
class Job:
    """One request as the model side sees it: token ids, sampling, the adapter version."""

    request: GenerationRequest
    adapter: AdapterRef | None

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.key if self.adapter else None


def _model_config(settings: ServeSettings):
    from inference.config import ModelConfig

    return ModelConfig(name_or_path=settings.base_model, dtype=settings.dtype)


def build_engine(settings: ServeSettings) -> HFEngine:
    from inference.model import load_base_model, load_tokenizer

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # As many threads as CPUs this replica holds: more spin against the other replicas'.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
    cfg = _model_config(settings)
    base_names = (
        [settings.base_model, *settings.base_model_aliases] if settings.check_base_name else []
    )
    return HFEngine(
        load_base_model(cfg, torch.device(device)),
        load_tokenizer(cfg),
        max_lora_rank=settings.max_lora_rank,
        max_adapters=settings.max_loaded_adapters,
        base_names=base_names,
        context_window=settings.context_window,
    )


class Prompts:
    """The tokenizer side of the base model, for an ingress that holds no weights."""

    def __init__(self, settings: ServeSettings):
        from transformers import AutoConfig

        from inference.model import load_tokenizer, resolve_model_path

        cfg = _model_config(settings)
        self.tokenizer = load_tokenizer(cfg)
        model_config = AutoConfig.from_pretrained(resolve_model_path(cfg))
        self.context_window = context_window_of(
            model_config, self.tokenizer, settings.context_window
        )

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]


def replica_name() -> str:
    """This Serve replica's id (what the x-model-replica header shows); "local" outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"


class ModelWorker:
    """Generates for jobs on any mix of adapters; raises ApiError for what a client did wrong."""

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        s = settings
        self.metrics = metrics
        self.replica = replica_name()
        self.engine = build_engine(s)
        self.registry = AdapterRegistry.from_settings(s)
        self.cache = AdapterCache(
            self.engine,
            self.registry,
            max_loaded=s.max_loaded_adapters,
            max_cpu=s.max_cpu_adapters,
            on_event=metrics.cache_event,
        )
        # Every model operation (adapter loads, generate) runs on this one thread, in order:
        # the event loop stays free for HTTP while a batch runs.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.generate_batch.set_max_batch_size(s.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    async def generate(self, job: Job) -> GenerationResult:
        if job.adapter is not None:
            # Reads and checks the adapter (400 if it cannot run on this base).
            await self.cache.prepare(job.adapter)
        result = await self.generate_batch(job)
        if isinstance(result, Exception):
            raise result
        return result

    async def pieces(self, job: Job) -> AsyncIterator[str | GenerationResult]:
        """Yields an empty string once the adapter is ready (errors before it are the request's,
        not the stream's), then each new piece of text as it is generated, then the result."""
        if job.adapter is not None:
            await self.cache.prepare(job.adapter)
        yield ""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        job.request.on_text = lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)
        task = asyncio.ensure_future(self.generate_batch(job))
        # The pieces were queued on the loop before the batch's result: this marker comes last.
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (text := await queue.get()) is not None:
                yield text
            result = task.result()
            if isinstance(result, Exception):
                raise result
            yield result
        finally:
            if not task.done():  # the client went away: free the row for others
                job.request.cancelled = True

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, jobs: list[Job]) -> list[GenerationResult | Exception]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.model_thread, self.run_batch, jobs)

    def run_batch(self, jobs: list[Job]) -> list[GenerationResult | Exception]:
        def observe(rows: int, adapters: int) -> None:
            self.metrics.batch_size.observe(rows)
            self.metrics.batch_adapters.observe(adapters)

        return generate_in_groups(self.engine, self.cache, [j.request for j in jobs], observe)


@dataclass
class Served:
    """What a model replica sends back for a whole (non-streamed) request."""

    result: GenerationResult | None
    replica: str
    error: ApiError | None = None


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
class ModelServer:
    """The `routed` layout's model deployment. Errors a client caused come back as values (an
    ApiError keeps its status, code and headers), never as a replica's traceback."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings.model_validate(settings)
        self.metrics = Metrics()
        self.worker = ModelWorker(self.settings, self.metrics)

    async def generate(self, job: Job) -> Served:
        try:
            return Served(await self.worker.generate(job), self.worker.replica)
        except ApiError as e:
            return Served(None, self.worker.replica, e)

    async def generate_stream(self, job: Job) -> AsyncIterator[Any]:
        """The replica's name, then what ModelWorker.pieces yields; an ApiError as the last item."""
        yield self.worker.replica
        try:
            async for piece in self.worker.pieces(job):
                yield piece
        except ApiError as e:
            yield e

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve's controller; the router (serve/routing.py) reads it."""
        return {**self.worker.cache.held_keys(), "replica": self.worker.replica}
