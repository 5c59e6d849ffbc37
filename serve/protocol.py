"""The OpenAI request bodies this server accepts and the response bodies it writes."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from inference.engine import GenerationResult, SamplingParams
from serve.errors import InvalidRequest, Unprocessable


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("content: required unless the assistant message has tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: tool-call arguments parsed (jinja cannot)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {
                        "name": c.function.name,
                        "arguments": _json_or_text(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Fields other OpenAI features send (user, metadata, ...) are ignored, not refused.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)  # the body as sent

    @property
    def raw(self) -> dict[str, Any]:
        return self._raw

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    # Checked here for their shape; the vllm engine serves them, the hf engine refuses them
    # (engine_refusal below).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def tools_for_template(self) -> list[dict[str, Any]] | None:
        return self.tools or None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)
    echo: Literal[False] = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# What only the vllm engine serves: a body that sets one of these (to more than its default) is a
# 400 on the hf engine, never silently ignored.
HF_REFUSES: dict[str, Any] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}


def engine_refusal(raw: dict[str, Any], engine: str) -> InvalidRequest | None:
    """The error for the first parameter this engine does not serve, or None."""
    if engine != "hf":
        return None
    for param, defaults in HF_REFUSES.items():
        if param in raw and raw[param] not in defaults:
            return InvalidRequest(
                f"'{param}' is not supported by this server's engine (hf); it is served with "
                "engine: vllm",
                param=param,
                code="unsupported_parameter",
            )
    return None


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Invalid JSON: 400. JSON that does not fit the request model: 422 naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise Unprocessable(f"{field}: {first['msg']}", param=field) from None
    body._raw = data
    return body


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def chat_response(request_id: str, model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(result),
    }


def completion_response(request_id: str, model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(result),
    }


def stream_chunk(
    request_id: str,
    model: str,
    chat: bool,
    text: str | None,
    finish_reason: str | None,
    *,
    first: bool = False,
    usage_of: GenerationResult | None = None,
) -> str:
    """One server-sent event in OpenAI's chunk format."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    chunk = {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage_of is not None else [choice],
    }
    if usage_of is not None:
        chunk["usage"] = usage(usage_of)
    return f"data: {json.dumps(chunk)}\n\n"
