"""Response plumbing that makes a client going away stop the worker, streaming or not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rbee_worker.protocol import events

from .relay import Upstream

T = TypeVar("T")


class RelayResponse(StreamingResponse):
    """A streamed response tied to an upstream stream: however it ends, the upstream is closed.

    Starlette cancels the body iterator when the client disconnects; if that happens
    before the iterator ever ran, its own `finally` never runs, so closing (which
    cancels the generation on the worker and frees the lease) happens here too.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        upstream: Upstream,
        on_close: Callable[[], None],
        headers: dict[str, str],
        media_type: str = events.SSE_MEDIA_TYPE,
    ) -> None:
        # SSE_HEADERS (no caching, no proxy buffering) suit any token stream, NDJSON too
        super().__init__(content, media_type=media_type, headers={**events.SSE_HEADERS, **headers})
        self._upstream = upstream
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._upstream.aclose()
            self._on_close()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` (the body is already read), cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        watcher.cancel()
        task.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnect()
