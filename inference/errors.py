"""The error shape clients read, `{"error": {"message", "type", "param", "code"}}` with an HTTP
status, for what the engines raise; the gateway's other errors (serve/errors.py) extend it."""

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


class AdapterIncompatible(InvalidRequest):
    """The adapter cannot run on this server's base model (other base, shapes, rank)."""

    code = "adapter_incompatible"
