"""Relay one OpenAI request to an upstream engine: its body as the client sent it, its answer as it came.

The queen does not re-shape what an engine answers: the client's JSON goes on
with only `model` renamed to the upstream's own name, a non-streamed answer
comes back with the engine's status and JSON, and a stream is passed through
byte for byte. What the queen adds is what the engine cannot say: that it is
down (502 before anything was sent, an error chunk if it dies mid-stream,
never silence), a client disconnect closing the upstream request, and metrics.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from rbee_worker.protocol import events
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .errors import sse_error
from .generation import RequestRecord
from .upstreams import Upstreams, UpstreamTarget, failure_cause

#: Longest upstream error body passed on (an HTML error page is not worth more).
MAX_ERROR_BODY = 64 * 1024
NETWORK_ERRORS = (httpx.TransportError,)
UPSTREAM_ERROR = "UPSTREAM_ERROR"


class UpstreamStream(StreamingResponse):
    """The engine's SSE stream; however the response ends, the upstream request is closed."""

    def __init__(self, resp: httpx.Response, content: AsyncIterator[bytes], record: RequestRecord) -> None:
        super().__init__(content, media_type=events.SSE_MEDIA_TYPE, headers=dict(events.SSE_HEADERS))
        self._resp = resp
        self._record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._resp.aclose()
            self._record.commit()  # "disconnected" unless the stream got to its end


async def relay(
    upstreams: Upstreams, target: UpstreamTarget, path: str, body: dict[str, Any], record: RequestRecord
) -> Response:
    """Send `body` to `<url>/<path>`; an error before any answer is raised (the caller counts it)."""
    state = target.state
    record.model, record.node = target.public_id, state.name
    request = upstreams.client.build_request(
        "POST",
        state.config.endpoint(path),
        content=json.dumps({**body, "model": target.model}).encode(),
        headers={"Content-Type": "application/json", **state.headers()},
    )
    try:
        resp = await upstreams.client.send(request, stream=True)
    except NETWORK_ERRORS as exc:
        upstreams.mark_down(state, failure_cause(exc))
        raise state.unavailable(failure_cause(exc)) from None
    if resp.status_code >= 400 or body.get("stream") is not True:
        try:
            raw = await _read_bounded(resp, None if resp.status_code < 400 else MAX_ERROR_BODY)
        except NETWORK_ERRORS as exc:
            raise state.unavailable(f"connection lost: {failure_cause(exc)}") from None
        finally:
            await resp.aclose()
        answer = _json_answer(target, resp.status_code, raw)
        if resp.status_code >= 400:
            record.error(UPSTREAM_ERROR)  # a fixed label: engines name their errors freely
        else:
            record.outcome = "ok"
        record.commit()
        return answer
    return UpstreamStream(resp, _passthrough(resp, target, record), record)


async def _passthrough(
    resp: httpx.Response, target: UpstreamTarget, record: RequestRecord
) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.aiter_raw():
            record.token()  # the first chunk: time to first byte, as rbee's own streams count it
            yield chunk
    except NETWORK_ERRORS as exc:
        record.error(ErrorCode.CONNECTION_FAILED)
        error = target.state.unavailable(f"the stream broke off: {failure_cause(exc)}")
        yield sse_error(error) + events.encode_done()
        return
    record.outcome = "ok"


async def _read_bounded(resp: httpx.Response, limit: int | None) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if limit is not None and size >= limit:
            break
    return b"".join(chunks)


def _excerpt(raw: bytes) -> str:
    return raw[:200].decode(errors="replace")


def _json_answer(target: UpstreamTarget, status: int, raw: bytes) -> Response:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return JSONResponse(data, status_code=status)
    # not JSON: say so in the queen's own error format, with what the engine said
    error = RbeeError(
        ErrorCode.INFERENCE_FAILED if status < 400 else ErrorCode.CONNECTION_FAILED,
        f"upstream {target.state.name} answered {status} without JSON: {_excerpt(raw)!r}",
        status=502,
        details={"upstream": target.state.name, "status": status},
    )
    raise error
