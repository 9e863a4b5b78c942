"""Read a request's JSON body with a size bound, the same way on every worker and queen route."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from rbee_worker.protocol.errors import ErrorCode, RbeeError

#: Prompts are text: 4 MiB is far beyond any context window and well short of a memory problem.
MAX_BODY_BYTES = 4 * 1024 * 1024


async def read_json(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RbeeError(
                ErrorCode.INVALID_REQUEST, f"body larger than {MAX_BODY_BYTES} bytes", status=413,
                details={"field": "body"},
            )  # fmt: skip
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST, f"body: invalid JSON ({exc})", status=400, details={"field": "body"}
        ) from None
