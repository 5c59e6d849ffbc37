"""Errors every layer of the serving app raises, each with its HTTP status and OpenAI error shape.

Clients read `{"error": {"message", "type", "param", "code"}}`; the openai client turns the status
into its exception class (404 -> NotFoundError, 429 -> RateLimitError, ...).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error the API returns as-is: the message is safe to show a client (no keys, no paths)."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class InvalidModelName(InvalidRequest):
    code = "invalid_model_name"


class AdapterIncompatible(InvalidRequest):
    """The adapter cannot run on this server's base model (other base, shapes, rank)."""

    code = "adapter_incompatible"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class Unprocessable(ApiError):
    status = 422
    type = "invalid_request_error"
    code = "invalid_value"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(ApiError):
    """Unknown model, and also a model the tenant may not use: one body for both, so that a
    tenant cannot probe which adapters exist."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )


class BodyTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(ApiError):
    status = 503
    type = "server_error"
    code = "overloaded"


class AdapterUnavailable(ApiError):
    """The adapter's storage could not be read (network, permissions): the server's side."""

    status = 503
    type = "server_error"
    code = "adapter_unavailable"
