"""ASGI middleware of the worker: request id, bearer auth, time-to-headers limit.

Order (outermost first): CORS → request id → auth → timeout, so a preflight never
needs a token and every response, errors included, carries `X-Request-ID`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..protocol.errors import ErrorCode, RbeeError

REQUEST_ID_HEADER = b"x-request-id"
CORRELATION_ID_HEADER = b"x-correlation-id"


def _printable(text: str) -> str:
    return "".join(c for c in text if " " <= c <= "~")


async def send_error(send: Send, error: RbeeError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


class RequestIdMiddleware:
    """Mint the request's id; a caller's `X-Request-ID` is kept only to correlate logs.

    The id names the generation `DELETE /v1/inference/{id}` cancels, so a caller
    must not choose it (it could pick another caller's). The response carries the
    worker's id in `X-Request-ID` and echoes the caller's in `X-Correlation-ID`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, REQUEST_ID_HEADER)
        correlation = _printable(given.decode("latin-1")[:128]) if given else ""
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {}).update(request_id=request_id, correlation_id=correlation or None)
        extra = [(REQUEST_ID_HEADER, request_id.encode())]
        if correlation:
            extra.append((CORRELATION_ID_HEADER, correlation.encode("latin-1")))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, public_paths: frozenset[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public_paths:
            given = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(given, self.expected):
                error = RbeeError(ErrorCode.INVALID_API_KEY, "missing or wrong bearer token", status=401)
                await send_error(send, error, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class HeadersTimeoutMiddleware:
    """Bound the time until response headers; a started stream is bounded by its own budget."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = asyncio.Event()

        async def watch_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, watch_send))
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=self.seconds, return_when=asyncio.FIRST_COMPLETED)
            if not started.is_set() and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                error = RbeeError(
                    ErrorCode.REQUEST_TIMEOUT, f"no response within {self.seconds:g} s", status=504
                )
                await send_error(send, error)
                return
            await task
        finally:
            waiter.cancel()
            task.cancel()
