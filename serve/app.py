"""The OpenAI-compatible, multi-tenant, multi-adapter Ray Serve app.

    serve run serve.app:build_app base_model=PATH registry=PATH_OR_S3 tenants=TENANTS.yaml
    serve run configs/serve.yaml

One deployment: each replica holds the base model once, an adapter cache, and batches requests
for any mix of adapters (and the base) into one generate call with `@serve.batch`.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation at runtime to
# validate the app builder's args with ServeSettings.
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.adapters import AdapterCache, AdapterRef, AdapterRegistry
from serve.config import ServeSettings
from serve.engine import Engine, GenerationRequest, GenerationResult, HFEngine
from serve.errors import ApiError, BodyTooLarge, ContextTooLong, InvalidRequest, ModelNotFound
from serve.metrics import Metrics
from serve.names import parse_model_name
from serve.protocol import (
    ChatRequest,
    CompletionRequest,
    chat_response,
    completion_response,
    new_id,
    parse_body,
    stream_chunk,
)
from serve.scheduler import generate_in_groups
from serve.tenants import Tenant, Tenants

log = logging.getLogger("ray.serve")

VERSION_HEADER = "x-adapter-version"

api = FastAPI(title="rayft serve", docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and methods, in the same error shape as everything else.
    error = InvalidRequest(str(e.detail), code="not_found" if e.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=e.status_code)


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(ApiError("The server had an error processing your request.").body(), 500)


@dataclass
class Job:
    """One request as the batcher sees it."""

    request: GenerationRequest
    adapter: AdapterRef | None


def build_engine(settings: ServeSettings) -> HFEngine:
    from jobs.config import ModelConfig
    from jobs.model import load_base_model, load_tokenizer

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # As many threads as CPUs this replica holds: more spin against the other replicas'.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
    cfg = ModelConfig(name_or_path=settings.base_model, dtype=settings.dtype)
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


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(api)
class MultiAdapterServer:
    def __init__(self, settings: dict):
        self.settings = s = ServeSettings.model_validate(settings)
        self.engine: Engine = build_engine(s)
        self.metrics = Metrics()
        self.registry = AdapterRegistry(
            s.registry, s.adapters, ttl_s=s.alias_ttl_s, download_dir=s.adapter_download_dir
        )
        self.cache = AdapterCache(
            self.engine, self.registry, max_loaded=s.max_loaded_adapters,
            max_cpu=s.max_cpu_adapters, on_event=self.metrics.cache_event,
        )  # fmt: skip
        self.tenants = Tenants.from_file(s.tenants) if s.tenants else None
        # Every model operation (adapter loads, generate) runs on this one thread, in order:
        # the event loop stays free for HTTP while a batch runs.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.generate_batch.set_max_batch_size(s.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    # --- routes ------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics_route(self) -> Response:
        if not self.settings.expose_metrics:
            raise StarletteHTTPException(404, "Not Found")
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        tenant = self.authenticate(request)
        names = [self.settings.base_model_id, *await asyncio.to_thread(self.registry.names)]
        allowed = [n for n in dict.fromkeys(names) if tenant is None or tenant.may_use(n)]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "rayft"} for n in allowed
            ],
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.complete(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.complete(request, chat=False)

    # --- request path ------------------------------------------------------------------------
    def authenticate(self, request: Request) -> Tenant | None:
        if self.tenants is None:
            return None
        return self.tenants.authenticate(request.headers.get("authorization"))

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"The request body is larger than {limit} bytes.")
        body = await request.body()
        if len(body) > limit:
            raise BodyTooLarge(f"The request body is larger than {limit} bytes.")
        return body

    async def resolve(self, model: str, tenant: Tenant | None) -> AdapterRef | None:
        """The adapter version `model` names (None: the base); 404 alike for unknown and not
        allowed, so that a tenant learns nothing about other tenants' adapters."""
        name = parse_model_name(model)
        if tenant is not None and not tenant.may_use(name.name):
            raise ModelNotFound(model)
        if name.name == self.settings.base_model_id:
            if name.selector is not None:
                raise ModelNotFound(model)
            return None
        return await asyncio.to_thread(self.registry.resolve, name)

    async def complete(self, request: Request, chat: bool) -> Response:
        model_label, status = "-", 500
        try:
            tenant = self.authenticate(request)
            body = parse_body(
                await self.read_body(request), ChatRequest if chat else CompletionRequest
            )
            ref = await self.resolve(body.model, tenant)
            model_label = ref.name if ref else self.settings.base_model_id
            prompt_ids = await asyncio.to_thread(
                self.engine.encode_chat, [{"role": m.role, "content": m.text()} for m in body.messages]
            ) if chat else await asyncio.to_thread(self.engine.encode_text, body.prompt)  # fmt: skip
            max_tokens = self.max_tokens_for(
                len(prompt_ids), body.requested_max_tokens, "messages" if chat else "prompt"
            )
            reserved = len(prompt_ids) + max_tokens
            if self.tenants is not None:
                self.tenants.admit(tenant, reserved)
            if ref is not None:
                # After admission: a tenant over its limits makes us read no adapter. Reads and
                # checks the adapter (400 if it cannot run on this base); a refusal costs nothing.
                try:
                    await self.cache.prepare(ref)
                except Exception:
                    self.settle(tenant, reserved, 0)
                    raise
            job = Job(
                GenerationRequest(prompt_ids, ref.key if ref else None, body.sampling(max_tokens)),
                ref,
            )
            served = ref.id if ref else self.settings.base_model_id
            headers = {VERSION_HEADER: ref.version if ref else "base"}
            request_id = new_id("chatcmpl" if chat else "cmpl")
            if body.stream:
                status = 200
                stream = self.stream(
                    job, request_id, served, chat, body.include_usage, tenant, reserved
                )
                return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
            used = 0  # a failed request costs the tenant nothing
            try:
                result = await self.run(job)
                used = result.prompt_tokens + result.completion_tokens
            finally:
                self.settle(tenant, reserved, used)
            self.metrics.usage(model_label, result.prompt_tokens, result.completion_tokens)
            make = chat_response if chat else completion_response
            status = 200
            return JSONResponse(make(request_id, served, result), headers=headers)
        except ApiError as e:
            status = e.status
            raise
        finally:
            self.metrics.request(model_label, status)

    def max_tokens_for(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        window = self.engine.context_window
        room = window - prompt_tokens
        if room < 1 or (requested is not None and requested > room):
            wanted = prompt_tokens + (requested or 1)
            raise ContextTooLong(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{wanted} tokens ({prompt_tokens} in the prompt, {requested or 1} for the "
                "completion). Please reduce the prompt or max_tokens.",
                param=param,
            )
        return requested or min(self.settings.default_max_tokens, room)

    def settle(self, tenant: Tenant | None, reserved: int, used: int) -> None:
        if self.tenants is not None:
            self.tenants.settle(tenant, reserved, used)

    async def run(self, job: Job) -> GenerationResult:
        result = await self.generate_batch(job)
        if isinstance(result, Exception):
            raise result
        return result

    async def stream(
        self, job: Job, request_id: str, model: str, chat: bool, include_usage: bool,
        tenant: Tenant | None, reserved: int,
    ) -> AsyncIterator[str]:  # fmt: skip
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        job.request.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        task = asyncio.ensure_future(self.run(job))
        # The pieces were queued on the loop before the batch's result: this marker comes last.
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        used = reserved  # a client that hangs up mid-stream gets no refund
        try:
            yield stream_chunk(request_id, model, chat, "" if chat else None, None, first=True)
            while (text := await pieces.get()) is not None:
                yield stream_chunk(request_id, model, chat, text, None)
            if task.exception() is not None:
                used, error = 0, task.exception()
                body = (
                    error.body()
                    if isinstance(error, ApiError)
                    else ApiError("generation failed").body()
                )
                yield f"data: {json.dumps(body)}\n\n"
                return
            result = task.result()
            used = result.prompt_tokens + result.completion_tokens
            self.metrics.usage(job.adapter.name if job.adapter else self.settings.base_model_id,
                               result.prompt_tokens, result.completion_tokens)  # fmt: skip
            yield stream_chunk(request_id, model, chat, None, result.finish_reason)
            if include_usage:
                yield stream_chunk(request_id, model, chat, None, None, usage_of=result)
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():  # the client went away: free the row for others
                job.request.cancelled = True
            self.settle(tenant, reserved, used)

    # --- batching ----------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, jobs: list[Job]) -> list[GenerationResult | Exception]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.model_thread, self.run_batch, jobs)

    def run_batch(self, jobs: list[Job]) -> list[GenerationResult | Exception]:
        def observe(rows: int, adapters: int) -> None:
            self.metrics.batch_size.observe(rows)
            self.metrics.batch_adapters.observe(adapters)

        return generate_in_groups(self.engine, self.cache, [j.request for j in jobs], observe)


def build_app(args: ServeSettings) -> serve.Application:
    """The Serve application for `serve run serve.app:build_app key=value ...`."""
    settings = args if isinstance(args, ServeSettings) else ServeSettings.model_validate(args)
    deployment = MultiAdapterServer.options(
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
    )
    return deployment.bind(settings.model_dump())
