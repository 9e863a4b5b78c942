"""The queen's error body: rbee's `{"error":{code,message,details}}` plus OpenAI's `type` and `param`.

OpenAI clients read `error.type`, `error.param` and `error.message`; rbee clients
read `error.code` and `error.details`. One body carries both so neither side has
to guess, and every route (OpenAI, native, registration) renders errors here.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from rbee_worker.protocol import jsontext
from rbee_worker.protocol.errors import RbeeError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def queen_error_body(error: RbeeError) -> dict[str, Any]:
    body = error.body()
    inner = body["error"]
    inner["type"] = error_type(error.status)
    field = error.details.get("field")
    inner["param"] = field if isinstance(field, str) else None
    if error.hint:
        inner["hint"] = error.hint
    return body


def error_response(error: RbeeError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response; `Retry-After` comes from `details.retry_after` when present."""
    all_headers = dict(headers or {})
    retry_after = error.details.get("retry_after")
    if isinstance(retry_after, int | float):
        all_headers["Retry-After"] = str(max(1, round(retry_after)))
    return JSONResponse(queen_error_body(error), status_code=error.status, headers=all_headers or None)


def sse_error(error: RbeeError) -> bytes:
    """An in-stream error for OpenAI streams: `data: {"error": {...}}` (the SDK raises on it)."""
    return b"data: " + jsontext.dumps_bytes(queen_error_body(error)) + b"\n\n"
