"""Errors every layer of the serving app raises, each with its HTTP status and OpenAI error shape.

Clients read `{"error": {"message", "type", "param", "code"}}`; the openai client turns the status
into its exception class (404 -> NotFoundError, 429 -> RateLimitError, ...).
"""

from __future__ import annotations

from inference.errors import AdapterIncompatible, ApiError, InvalidRequest

# The shape and the engines' errors come from the inference layer; the gateway imports every error from here.
__all__ = ["AdapterIncompatible", "ApiError", "InvalidRequest"]


class InvalidModelName(InvalidRequest):
    code = "invalid_model_name"


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
