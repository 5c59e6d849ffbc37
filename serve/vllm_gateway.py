"""engine: vllm, the ingress's side: a request past our checks (tenant, limits, adapter version,
context) goes to the VllmServer deployment (serve/vllm_server.py) as vLLM's own OpenAI request;
its answer comes back under our names (`model` is NAME@VERSION) with its usage counted.

Serve's multiplexed model id is the adapter's immutable NAME@VERSION: Serve sends the request to
a replica that already holds that adapter when there is one, and vLLM gives each id a LoRA slot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from serve.errors import AdapterIncompatible, ApiError, InvalidRequest
from serve.replicas import REPLICA_GONE, with_replica_retries

log = logging.getLogger("ray.serve")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


def engine_request(raw: dict[str, Any], *, chat: bool, model_id: str, max_tokens: int):
    """vLLM's request model (Ray Serve LLM's subclass) for the body as the client sent it, with
    our model id, the max_tokens we reserved for, and usage always in a stream's last event."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    body = {k: v for k, v in raw.items() if k != "max_completion_tokens"}
    body |= {"model": model_id, "max_tokens": max_tokens}
    if body.get("stream"):
        body["stream_options"] = {"include_usage": True}
    try:
        request = (ChatCompletionRequest if chat else CompletionRequest)(**body)
    except ValueError as e:  # pydantic's: what our own checks let through, vLLM's refuse
        raise InvalidRequest(_first_line(e)) from None
    if chat:
        # Tool-call messages hold pydantic iterators that cannot be pickled.
        from core.upstream.ray import picklable_chat_request

        request = picklable_chat_request(request)
    return request


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def engine_error(error) -> ApiError:
    """vLLM's ErrorResponse as our error: its status and message, OpenAI's shape."""
    info = error.error
    api = InvalidRequest(info.message, param=getattr(info, "param", None))
    api.status = int(info.code) if str(info.code).isdigit() else 400
    if api.status >= 500:
        api.type = "server_error"
    return api


def remote_error(e: RayTaskError, model_id: str) -> ApiError:
    """What a replica raised: our ApiErrors (adapter not found, incompatible, unreadable) as they
    are; vLLM refusing an adapter as a 400; anything else a 500 without its details."""
    cause = e.cause if isinstance(e, RayTaskError) else e
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, ValueError) and "lora" in str(cause).lower():
        log.warning("vLLM refused adapter %s: %s", model_id, cause)
        return AdapterIncompatible(
            f"adapter '{model_id}' cannot run on this server's base model: "
            f"{_first_line(cause).split(': ', 1)[-1]}"
        )
    log.warning("a model replica failed a request: %s: %s", type(cause).__name__, cause)
    return ApiError("The server had an error processing your request.")


class VllmUpstream:
    """Calls into the VllmServer deployment, with retries while no answer has come back."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        # vLLM's request models: imported now, not on the first request (vLLM takes seconds).
        import ray.serve.llm.openai_api_models  # noqa: F401

    async def open(self, request, *, chat: bool, model_id: str | None) -> tuple[Any, Any]:
        """The first item of the replica's answer stream and the stream itself."""
        handle = self.handle.options(stream=True, multiplexed_model_id=model_id or "")
        method = handle.chat if chat else handle.completions

        async def attempt():
            stream = method.remote(request)
            try:
                return await anext(stream), stream
            except REPLICA_GONE:
                stream.cancel()
                raise
            except RayTaskError as e:
                raise remote_error(e, model_id or "base") from None

        first, stream = await with_replica_retries(attempt)
        # Streamed events come in batches (lists); a whole answer or an error is one item.
        if not isinstance(first, list) and type(first).__name__ == "ErrorResponse":
            raise engine_error(first)
        return first, stream

    async def answer(self, request, *, chat: bool, model_id: str | None, served: str):
        """A whole (non-streamed) answer as a JSON body and its usage."""
        first, stream = await self.open(request, chat=chat, model_id=model_id)
        stream.cancel()  # a whole answer is one item
        body = first.model_dump(exclude_none=False)
        body["model"] = served
        u = body.get("usage") or {}
        return body, Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))


async def sse_events(
    first: Any, stream: Any, *, served: str, include_usage: bool, usage: Usage
) -> AsyncIterator[str]:
    """The replica's server-sent events with `model` renamed; the usage event (always asked
    for) read into `usage`, and passed on only when the client asked for it. A replica that dies
    mid-stream ends it with an error event in OpenAI's shape."""
    batch = first
    try:
        while True:
            for item in batch if isinstance(batch, list) else [batch]:
                for event in _events(item):
                    out = _renamed(event, served, include_usage, usage)
                    if out is not None:
                        yield out
            try:
                batch = await anext(stream)
            except StopAsyncIteration:
                return
    except (*REPLICA_GONE, RayTaskError) as e:
        log.warning("a stream failed: %s", type(e).__name__)
        yield f"data: {json.dumps(ApiError('generation failed').body())}\n\n"
    finally:
        stream.cancel()


def _events(item: Any) -> list[str]:
    if not isinstance(item, str):
        item = f"data: {item.model_dump_json()}\n\n"
    return [e for e in item.split("\n\n") if e.strip()]


def _renamed(event: str, served: str, include_usage: bool, usage: Usage) -> str | None:
    data = event.removeprefix("data: ").strip()
    if data == "[DONE]":
        return "data: [DONE]\n\n"
    chunk = json.loads(data)
    if "model" in chunk:
        chunk["model"] = served
    if chunk.get("usage"):
        usage.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
        usage.completion_tokens = chunk["usage"].get("completion_tokens", 0)
        if not chunk.get("choices"):  # the usage event
            if not include_usage:
                return None
        elif not include_usage:
            chunk["usage"] = None
    return f"data: {json.dumps(chunk)}\n\n"
