"""The OpenAI-compatible, multi-tenant, multi-adapter Ray Serve app.

    serve run serve.app:build_app base_model=PATH registry=PATH_OR_S3 tenants=TENANTS.yaml
    serve run configs/serve.yaml

Two layouts (setting `layout`):
- `single`: one deployment; each replica parses, authenticates and tokenizes, holds the base model
  once with an adapter cache, and batches requests for any mix of adapters (and the base) into one
  generate call with `@serve.batch`.
- `routed`: a light ingress (this class, no weights) calls a `ModelServer` deployment
  (serve/model.py) through a handle; serve/routing.py sends each request to a model replica that
  already holds its adapter, and each model replica still batches across adapters.
Two engines (setting `engine`): `hf`, our transformers engine, in either layout; `vllm`, Ray Serve
LLM's LLMServer on vLLM as the model deployment (serve/vllm_server.py), called from this ingress
(serve/vllm_gateway.py). Everything in this file (keys, limits, versions, errors) serves both.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation at runtime to
# validate the app builder's args with ServeSettings.
import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.engine import GenerationRequest, GenerationResult
from serve.adapters import AdapterRef, AdapterRegistry
from serve.config import ServeSettings
from serve.errors import (
    ApiError,
    BodyTooLarge,
    ContextTooLong,
    InvalidRequest,
    ModelNotFound,
)
from serve.finetuning import api as finetuning_api
from serve.finetuning import models as finetuned
from serve.limits import LocalLimits, Release, SharedLimits, limiter_name
from serve.metrics import Metrics
from serve.model import Job, ModelServer, ModelWorker, Prompts
from serve.names import parse_model_name
from serve.protocol import (
    ChatRequest,
    CompletionRequest,
    chat_response,
    completion_response,
    engine_refusal,
    new_id,
    parse_body,
    stream_chunk,
)
from serve.replicas import REPLICA_GONE, overloaded, with_replica_retries
from serve.routing import AdapterAffinityRouter
from serve.tenants import Tenant, Tenants
from serve.vllm_gateway import Usage, VllmUpstream, engine_request, sse_events

log = logging.getLogger("ray.serve")

VERSION_HEADER = "x-adapter-version"
REPLICA_HEADER = "x-model-replica"  # the replica that generated: routing is visible and testable
# Rows and distinct adapters of the batch a request ran in; sent with expose_metrics (like
# /metrics, it tells a client something about the load from others).
BATCH_HEADER = "x-batch"


api = FastAPI(title="rayft serve", docs_url=None, redoc_url=None)
# /v1/files and /v1/fine_tuning/jobs: 404s unless the settings have a finetuning section
api.include_router(finetuning_api.router)


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


# Defined before the deployment: Serve pickles the class when it is decorated, with the module
# globals that exist then.
async def _remote_pieces(remote) -> AsyncIterator:
    """A model replica's stream, its ApiError item raised here; closing it cancels the replica's
    generator (the row stops at its next token)."""
    finished = False
    try:
        async for item in remote:
            if isinstance(item, ApiError):
                raise item
            yield item
        finished = True
    finally:
        if not finished:
            remote.cancel()


def _no_release(used: int) -> None:
    pass


@dataclass
class Call:
    """A request past its checks and its tenant's limits, on its way to the model."""

    job: Job
    chat: bool  # /v1/chat/completions, else /v1/completions
    request_id: str
    served: str  # the model the response names: NAME@VERSION, or the base's id
    headers: dict[str, str]
    reserved: int  # prompt + max_tokens, taken from the tenant's token limit
    release: Release  # gives the tenant back what the request did not use
    include_usage: bool  # streams: a last chunk with the usage
    max_tokens: int  # per choice, settled against the context window


def app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:
        return "local"


def admission_limit(s: ServeSettings) -> int | None:
    """How many requests one ingress replica holds before it answers 503 itself."""
    if s.resolved_layout == "routed":
        return s.ingress_max_ongoing_requests
    if s.max_queued_requests < 0:
        return None
    return s.max_ongoing_requests + s.max_queued_requests


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(api)
class MultiAdapterServer:
    """The HTTP side. With `model` (a ModelServer or, engine vllm, a VllmServer handle) it holds
    no weights and forwards each request; without, it runs the model in this replica (the hf
    engine's `single` layout)."""

    def __init__(self, settings: dict, model: DeploymentHandle | None = None):
        self.settings = s = ServeSettings.model_validate(settings)
        self.engine = s.resolved_engine
        self.metrics = Metrics()
        self.vllm = VllmUpstream(model) if self.engine == "vllm" else None
        self.model = model if self.vllm is None else None
        if model is None:
            self.worker: ModelWorker | None = ModelWorker(s, self.metrics)
            self.prompts = self.worker.engine
            self.registry = self.worker.registry
        else:
            self.worker = None
            self.prompts = Prompts(s)
            self.registry = AdapterRegistry.from_settings(s)
        self.tenants = Tenants.from_file(s.tenants) if s.tenants else None
        self.limits: LocalLimits | SharedLimits | None = None
        if self.tenants is not None:
            self.limits = (
                SharedLimits(self.tenants, s.tenants, limiter_name(app_name(), s.tenants))
                if s.shared_rate_limits
                else LocalLimits(self.tenants)
            )
            if isinstance(self.limits, SharedLimits):
                self.limits.start()
        # Requests in this replica (running, batching, waiting): over the limit is a 503 in the
        # OpenAI shape here, before Serve's own queue limit would answer in plain text.
        self.admitted = 0
        self.max_admitted = admission_limit(s)
        self.finetuning = self.start_finetuning(s)

    def start_finetuning(self, s: ServeSettings):
        """The fine-tuning API's service in this replica, and its reconciler (jobs brought in
        line with their Ray jobs now, after a restart, and every few seconds)."""
        if s.finetuning is None:
            return None
        from serve.finetuning.reconcile import Reconciler
        from serve.finetuning.service import FineTuning

        service = FineTuning(s.finetuning, s.registry, s.max_lora_rank)
        finetuning_api.install(service, self.tenants)
        Reconciler(service.sessions, service.launcher, s.finetuning.reconcile_every_s).start()
        return service

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
        # ftjob-* registry names are served only as their owner's ft: ids
        names = [n for n in names if not finetuned.is_reserved(n)]
        allowed = [n for n in dict.fromkeys(names) if tenant is None or tenant.may_use(n)]
        if self.finetuning is not None:
            owner = tenant.name if tenant else finetuning_api.DEFAULT_TENANT
            allowed += await asyncio.to_thread(self.finetuning.owned_models, owner)
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
        if finetuned.is_fine_tuned(model) and self.finetuning is not None:
            # a fine-tuned model: its owner's, whatever the tenant's allow-list says
            owner = tenant.name if tenant else finetuning_api.DEFAULT_TENANT
            name = await asyncio.to_thread(self.finetuning.model_name, model, owner)
            return await asyncio.to_thread(self.registry.resolve, name)
        name = parse_model_name(model)
        if finetuned.is_reserved(name.name):
            raise ModelNotFound(model)
        if tenant is not None and not tenant.may_use(name.name):
            raise ModelNotFound(model)
        if name.name == self.settings.base_model_id:
            if name.selector is not None:
                raise ModelNotFound(model)
            return None
        return await asyncio.to_thread(self.registry.resolve, name)

    async def complete(self, request: Request, chat: bool) -> Response:
        model_label, status = "-", 500
        if self.max_admitted is not None and self.admitted >= self.max_admitted:
            self.metrics.request(model_label, 503)
            raise overloaded(f"{self.admitted} requests in this replica")
        self.admitted += 1
        admitted = True  # a stream leaves this replica's count when it ends
        try:
            tenant = self.authenticate(request)
            request_type = ChatRequest if chat else CompletionRequest
            body = parse_body(await self.read_body(request), request_type)
            if (refusal := engine_refusal(body.raw, self.engine)) is not None:
                raise refusal
            ref = await self.resolve(body.model, tenant)
            model_label = self.model_label(ref)
            call = await self.admit(body, ref, tenant, chat)
            if finetuned.is_fine_tuned(body.model):
                call.served = body.model  # answers name the ft: id; the header, the version
            if self.vllm is not None:
                response = await self.vllm_response(body, call)
                admitted = not body.stream
            elif body.stream:
                response = await self.stream_response(call)
                admitted = False
            else:
                response = await self.json_response(call)
            status = 200
            return response
        except ApiError as e:
            status = e.status
            raise
        finally:
            if admitted:
                self.admitted -= 1
            self.metrics.request(model_label, status)

    def model_label(self, ref: AdapterRef | None) -> str:
        """The model as the metrics name it: the adapter's name (any version) or the base's id."""
        return ref.name if ref else self.settings.base_model_id

    async def encode(self, body: ChatRequest | CompletionRequest, chat: bool) -> list[int]:
        if chat:
            messages = [m.for_template() for m in body.messages]
            if body.tools:  # only the vllm engine gets here with tools (Prompts)
                return await asyncio.to_thread(self.prompts.encode_chat, messages, body.tools)
            return await asyncio.to_thread(self.prompts.encode_chat, messages)
        return await asyncio.to_thread(self.prompts.encode_text, body.prompt)

    async def admit(
        self,
        body: ChatRequest | CompletionRequest,
        ref: AdapterRef | None,
        tenant: Tenant | None,
        chat: bool,
    ) -> Call:
        """The request tokenized, its max_tokens settled and taken from the tenant's limits."""
        prompt_ids = await self.encode(body, chat)
        max_tokens = self.max_tokens_for(
            len(prompt_ids), body.requested_max_tokens, "messages" if chat else "prompt"
        )
        reserved = len(prompt_ids) + max_tokens * body.n
        release: Release = _no_release
        if self.limits is not None:
            # Before any adapter is read: a tenant over its limits costs no storage read.
            release = await self.limits.admit(tenant, reserved)
        request = GenerationRequest(prompt_ids, ref.key if ref else None, body.sampling(max_tokens))
        return Call(
            job=Job(request, ref),
            chat=chat,
            request_id=new_id("chatcmpl" if chat else "cmpl"),
            served=ref.id if ref else self.settings.base_model_id,
            headers={VERSION_HEADER: ref.version if ref else "base"},
            reserved=reserved,
            release=release,
            include_usage=body.include_usage,
            max_tokens=max_tokens,
        )

    async def stream_response(self, call: Call) -> StreamingResponse:
        try:
            # The adapter is read and checked before the 200: its errors are HTTP errors.
            pieces, call.headers[REPLICA_HEADER] = await self.open_stream(call.job)
        except BaseException:
            call.release(0)  # a failed request costs the tenant nothing
            raise
        stream = self.stream(pieces, call)
        return StreamingResponse(stream, media_type="text/event-stream", headers=call.headers)

    async def json_response(self, call: Call) -> JSONResponse:
        used = 0  # a failed request costs the tenant nothing
        try:
            result, call.headers[REPLICA_HEADER] = await self.execute(call.job)
            used = result.prompt_tokens + result.completion_tokens
        finally:
            call.release(used)
        if self.settings.expose_metrics:
            batch = f"rows={result.batch_rows}; adapters={result.batch_adapters}"
            call.headers[BATCH_HEADER] = batch
        label = self.model_label(call.job.adapter)
        self.metrics.usage(label, result.prompt_tokens, result.completion_tokens)
        make = chat_response if call.chat else completion_response
        return JSONResponse(make(call.request_id, call.served, result), headers=call.headers)

    # --- engine vllm -------------------------------------------------------------------------
    async def vllm_response(self, body: ChatRequest | CompletionRequest, call: Call) -> Response:
        ref = call.job.adapter
        request = engine_request(
            body.raw,
            chat=call.chat,
            model_id=ref.id if ref else self.settings.base_model_id,
            max_tokens=call.max_tokens,
        )
        model_id = ref.id if ref else None
        if not body.stream:
            used = 0  # a failed request costs the tenant nothing
            try:
                answer, usage = await self.vllm.answer(
                    request, chat=call.chat, model_id=model_id, served=call.served
                )
                used = usage.prompt_tokens + usage.completion_tokens
            finally:
                call.release(used)
            self.metrics.usage(self.model_label(ref), usage.prompt_tokens, usage.completion_tokens)
            return JSONResponse(answer, headers=call.headers)
        try:
            first, stream = await self.vllm.open(request, chat=call.chat, model_id=model_id)
        except BaseException:
            call.release(0)
            raise
        events = self.vllm_stream(first, stream, call)
        return StreamingResponse(events, media_type="text/event-stream", headers=call.headers)

    async def vllm_stream(self, first, stream, call: Call) -> AsyncIterator[str]:
        usage = Usage()
        try:
            async for event in sse_events(
                first, stream, served=call.served, include_usage=call.include_usage, usage=usage
            ):
                yield event
        finally:
            self.admitted -= 1
            used = usage.prompt_tokens + usage.completion_tokens
            # No usage event: the stream broke off; the client is charged what it reserved.
            call.release(used if used else call.reserved)
            if used:
                label = self.model_label(call.job.adapter)
                self.metrics.usage(label, usage.prompt_tokens, usage.completion_tokens)

    def max_tokens_for(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        window = self.prompts.context_window
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

    # --- running a job, here or on a model replica -------------------------------------------
    async def execute(self, job: Job) -> tuple[GenerationResult, str]:
        """The job's result and the replica that generated it."""
        if self.worker is not None:
            return await self.worker.generate(job), self.worker.replica
        served = await with_replica_retries(lambda: self.model.generate.remote(job))
        if served.error is not None:
            raise served.error
        return served.result, served.replica

    async def open_stream(self, job: Job) -> tuple[AsyncIterator, str]:
        """Pieces of text, then the GenerationResult, from a started generation (its adapter
        is ready), and the replica that generates."""
        if self.worker is not None:
            pieces = self.worker.pieces(job)
            await anext(pieces)
            return pieces, self.worker.replica

        async def attempt():
            remote = self.model.options(stream=True).generate_stream.remote(job)
            try:
                return remote, await anext(remote), await anext(remote)
            except REPLICA_GONE:
                remote.cancel()
                raise

        remote, replica, ready = await with_replica_retries(attempt)
        if isinstance(ready, ApiError):
            raise ready
        return _remote_pieces(remote), replica

    async def stream(self, pieces: AsyncIterator, call: Call) -> AsyncIterator[str]:
        request_id, model, chat = call.request_id, call.served, call.chat
        used = call.reserved  # a client that hangs up mid-stream gets no refund
        try:
            # aclosing: a client that goes away closes `pieces`, which frees the row.
            async with contextlib.aclosing(pieces):
                yield stream_chunk(request_id, model, chat, "" if chat else None, None, first=True)
                result = None
                try:
                    async for item in pieces:
                        if isinstance(item, str):
                            yield stream_chunk(request_id, model, chat, item, None)
                        else:
                            result = item
                    if result is None:  # a replica's stream that ended early
                        raise ApiError("generation failed")
                except Exception as error:
                    used = 0
                    if not isinstance(error, ApiError):
                        log.warning("a stream failed: %s", type(error).__name__)
                        error = ApiError("generation failed")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
            used = result.prompt_tokens + result.completion_tokens
            label = self.model_label(call.job.adapter)
            self.metrics.usage(label, result.prompt_tokens, result.completion_tokens)
            yield stream_chunk(request_id, model, chat, None, result.finish_reason)
            if call.include_usage:
                yield stream_chunk(request_id, model, chat, None, None, usage_of=result)
            yield "data: [DONE]\n\n"
        finally:
            self.admitted -= 1
            call.release(used)


def build_app(args: ServeSettings) -> serve.Application:
    """The Serve application for `serve run serve.app:build_app key=value ...`."""
    s = args if isinstance(args, ServeSettings) else ServeSettings.model_validate(args)
    limit = admission_limit(s)
    # Serve's own limits sit above ours, so that overload is always our 503 (OpenAI's shape, with
    # Retry-After), never Serve's plain-text one: Serve forwards, the replica refuses at once.
    ingress = MultiAdapterServer.options(
        max_ongoing_requests=limit + max(16, limit) if limit is not None else 100_000,
        max_queued_requests=-1,
    )
    if s.resolved_engine == "vllm":
        from serve.vllm_server import vllm_deployment

        ingress = ingress.options(
            ray_actor_options={"num_cpus": s.ingress_cpus}, num_replicas=s.ingress_replicas
        )
        return ingress.bind(s.model_dump(), vllm_deployment(s))
    if s.resolved_layout == "single":
        return ingress.bind(s.model_dump())
    model = ModelServer.options(
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        request_router_config=RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={
                "imbalance": s.routing_imbalance,
                "memory_s": s.routing_stats_period_s + 2,
            },
            request_routing_stats_period_s=s.routing_stats_period_s,
        ),
        **({"num_replicas": s.model_replicas} if s.model_replicas is not None else {}),
    )
    ingress = ingress.options(
        ray_actor_options={"num_cpus": s.ingress_cpus}, num_replicas=s.ingress_replicas
    )
    return ingress.bind(s.model_dump(), model.bind(s.model_dump()))
