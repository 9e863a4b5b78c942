"""SSE comment keep-alives while a streamed request waits for a worker (a queue, a cold start).

A cold start can take minutes, and a proxy or a client with a read timeout
drops a connection that stays silent that long. A stream whose worker has not
committed within one keep-alive interval is therefore answered at once (200,
`text/event-stream`) and sent `: ping` comments every interval until the worker's
stream commits; clients ignore comments. What fails before that interval keeps
its HTTP status (a 400, a 503 with `Retry-After`); what fails after it can only
be an in-stream error, which the route writes in its own format.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rbee_worker.protocol import events
from rbee_worker.protocol.errors import RbeeError

from .relay import Upstream

#: Seconds of silence before the first `: ping`, and between pings (`--sse-keepalive`).
DEFAULT_INTERVAL = 10.0

Opening = asyncio.Future[Upstream]


async def first_wait(opening: Opening, interval: float) -> Upstream | None:
    """The upstream if it opened within `interval` (its error raised as it is), else None: still waiting."""
    try:
        done, _pending = await asyncio.wait({opening}, timeout=interval)
    except BaseException:
        await discard(opening)
        raise
    return opening.result() if done else None


async def discard(opening: Opening) -> None:
    """Nobody will read this stream: stop waiting for it, or close it if it opened meanwhile."""
    if not opening.done():
        opening.cancel()
        with contextlib.suppress(BaseException):
            await opening
        return
    if not opening.cancelled() and opening.exception() is None:
        await opening.result().aclose()


class WaitingResponse(StreamingResponse):
    """A stream answered before its worker committed: pings, then `body(upstream)` or `failed(error)`.

    However the response ends (finished, client gone, error), the wait is abandoned
    or the upstream closed, and `on_close` runs once.
    """

    def __init__(
        self,
        opening: Opening,
        interval: float,
        body: Callable[[Upstream], AsyncIterator[bytes]],
        failed: Callable[[RbeeError], bytes],
        on_close: Callable[[], None],
        headers: dict[str, str],
    ) -> None:
        self._opening = opening
        self._interval = interval
        self._body = body
        self._failed = failed
        self._on_close = on_close
        super().__init__(
            self._stream(), media_type=events.SSE_MEDIA_TYPE, headers={**events.SSE_HEADERS, **headers}
        )

    async def _stream(self) -> AsyncIterator[bytes]:
        yield events.encode_comment()  # the first interval has passed already
        while not (await asyncio.wait({self._opening}, timeout=self._interval))[0]:
            yield events.encode_comment()
        try:
            upstream = self._opening.result()
        except RbeeError as exc:
            yield self._failed(exc)
            return
        async for chunk in self._body(upstream):
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await discard(self._opening)
            self._on_close()
