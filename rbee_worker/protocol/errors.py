"""Error codes and the one error body every rbee HTTP API returns.

`{"error": {"code": "UPPER_SNAKE", "message": "...", "details": {...}}}` — the
worker, the hive API and the queen all build it here, and every client parses it
here, so a code means the same thing on both ends of a wire.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    INVALID_API_KEY = "INVALID_API_KEY"
    FORBIDDEN = "FORBIDDEN"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    NOT_FOUND = "NOT_FOUND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_LOADING = "MODEL_LOADING"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    INVALID_MODEL_FILE = "INVALID_MODEL_FILE"
    BACKEND_NOT_AVAILABLE = "BACKEND_NOT_AVAILABLE"
    ALL_SLOTS_BUSY = "ALL_SLOTS_BUSY"
    WORKER_DRAINING = "WORKER_DRAINING"
    WORKER_CRASHED = "WORKER_CRASHED"
    WORKER_NOT_FOUND = "WORKER_NOT_FOUND"
    WORKER_EXISTS = "WORKER_EXISTS"
    TOO_MANY_WORKERS = "TOO_MANY_WORKERS"
    REQUEST_CANCELED = "REQUEST_CANCELED"
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
    INFERENCE_FAILED = "INFERENCE_FAILED"
    CHAT_TEMPLATE_FAILED = "CHAT_TEMPLATE_FAILED"
    LOADING_TIMEOUT = "LOADING_TIMEOUT"
    INSUFFICIENT_RAM = "INSUFFICIENT_RAM"
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    DISK_FULL = "DISK_FULL"
    CONNECTION_TIMEOUT = "CONNECTION_TIMEOUT"
    CONNECTION_FAILED = "CONNECTION_FAILED"
    HOST_KEY_UNKNOWN = "HOST_KEY_UNKNOWN"
    HOST_KEY_CHANGED = "HOST_KEY_CHANGED"
    UNKNOWN_NODE = "UNKNOWN_NODE"
    INVENTORY_INVALID = "INVENTORY_INVALID"
    HIVE_NOT_RUNNING = "HIVE_NOT_RUNNING"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    NO_PORT_AVAILABLE = "NO_PORT_AVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class RbeeError(Exception):
    """An error with a wire code; raised anywhere, rendered once at the edge."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        status: int = 500,
        details: dict[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.status = status
        self.details = details or {}
        self.hint = hint

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)

    @classmethod
    def from_body(cls, body: Any, status: int = 500) -> RbeeError:
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


def error_body(code: ErrorCode | str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": str(code), "message": message, "details": details or {}}}
