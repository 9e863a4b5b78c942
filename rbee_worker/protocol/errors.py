"""Error codes and the one error body every rbee HTTP API returns.

`{"error": {"code": "UPPER_SNAKE", "message": "...", "details": {...}}}` — the
worker, the hive API and the queen all build it here, and every client parses it
here, so a code means the same thing on both ends of a wire.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """A wire code and the HTTP status it answers with unless one site says otherwise."""

    status: int

    def __new__(cls, value: str, status: int = 500) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        return member

    INVALID_REQUEST = "INVALID_REQUEST", 400
    INVALID_API_KEY = "INVALID_API_KEY", 401
    FORBIDDEN = "FORBIDDEN", 403
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE", 415
    NOT_FOUND = "NOT_FOUND", 404
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND", 404
    MODEL_LOADING = "MODEL_LOADING", 503
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED", 500
    INVALID_MODEL_FILE = "INVALID_MODEL_FILE", 422
    BACKEND_NOT_AVAILABLE = "BACKEND_NOT_AVAILABLE", 422
    ALL_SLOTS_BUSY = "ALL_SLOTS_BUSY", 503
    WORKER_DRAINING = "WORKER_DRAINING", 503
    WORKER_CRASHED = "WORKER_CRASHED", 502
    WORKER_NOT_FOUND = "WORKER_NOT_FOUND", 404
    WORKER_EXISTS = "WORKER_EXISTS", 409
    TOO_MANY_WORKERS = "TOO_MANY_WORKERS", 503
    REQUEST_CANCELED = "REQUEST_CANCELED", 503
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT", 504
    INFERENCE_FAILED = "INFERENCE_FAILED", 500
    CHAT_TEMPLATE_FAILED = "CHAT_TEMPLATE_FAILED", 422
    LOADING_TIMEOUT = "LOADING_TIMEOUT", 504
    INSUFFICIENT_RAM = "INSUFFICIENT_RAM", 507
    INSUFFICIENT_VRAM = "INSUFFICIENT_VRAM", 507
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED", 502
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH", 422
    DISK_FULL = "DISK_FULL", 507
    CONNECTION_TIMEOUT = "CONNECTION_TIMEOUT", 504
    CONNECTION_FAILED = "CONNECTION_FAILED", 502
    HOST_KEY_UNKNOWN = "HOST_KEY_UNKNOWN", 502
    HOST_KEY_CHANGED = "HOST_KEY_CHANGED", 502
    UNKNOWN_NODE = "UNKNOWN_NODE", 404
    INVENTORY_INVALID = "INVENTORY_INVALID", 400
    HIVE_NOT_RUNNING = "HIVE_NOT_RUNNING", 503
    VERSION_MISMATCH = "VERSION_MISMATCH", 500
    PREREQUISITES_MISSING = "PREREQUISITES_MISSING", 422
    NO_PORT_AVAILABLE = "NO_PORT_AVAILABLE", 503
    RPC_SERVER_UNREACHABLE = "RPC_SERVER_UNREACHABLE", 502
    RPC_VERSION_MISMATCH = "RPC_VERSION_MISMATCH", 422
    INTERNAL_ERROR = "INTERNAL_ERROR", 500


class RbeeError(Exception):
    """An error with a wire code; raised anywhere, rendered once at the edge."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.status = status if status is not None else default_status(code)
        self.details = details or {}
        self.hint = hint

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)

    @classmethod
    def from_body(cls, body: Any, status: int | None = None) -> RbeeError:
        """Rebuild the error a peer sent; tolerate bodies that are not ours."""
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            return cls(
                str(err.get("code", ErrorCode.INTERNAL_ERROR)),
                str(err.get("message", "")),
                status=status,
                details=err.get("details") or {},
            )
        return cls(ErrorCode.INTERNAL_ERROR, f"unexpected error body: {body!r}"[:300], status=status)


def default_status(code: ErrorCode | str) -> int:
    """The status a code answers with; 500 for a code this side does not know (a newer peer's)."""
    if isinstance(code, ErrorCode):
        return code.status
    try:
        return ErrorCode(code).status
    except ValueError:
        return 500


def error_body(code: ErrorCode | str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": str(code), "message": message, "details": details or {}}}
