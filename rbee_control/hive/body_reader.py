"""A download's body, read straight from the connection once its length is known.

httpx hands a streamed body over in pieces of at most 64 KiB, each through h11's
framing and two async generators: on loopback that alone held a model download
to under half of `curl`'s speed. A body with a `Content-Length` and no transfer
or content coding needs no framing, so after the first piece (whatever h11 had
buffered with the headers) the rest is read from the connection's own stream
(httpcore's `network_stream` response extension) in 1 MiB reads, up to exactly
the declared length. h11 then never sees the body end, so the connection is
closed with the response instead of going back to the pool — a download has
nothing to send on it after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpcore
import httpx

#: bytes asked of the connection per read (a read returns what has arrived, up to this)
READ_BYTES = 1 << 20


def _direct_length(resp: httpx.Response) -> int | None:
    """The body's length when it may be read past h11; None when it must go through it."""
    headers = resp.headers
    length = headers.get("content-length", "")
    if not length.isdigit() or "transfer-encoding" in headers:
        return None
    if headers.get("content-encoding", "identity").lower() != "identity":
        return None
    if "network_stream" not in resp.extensions:
        return None
    return int(length)


async def body_chunks(resp: httpx.Response, read_timeout: float | None) -> AsyncIterator[bytes]:
    """The raw body as it arrives; errors surface as httpx's (`ReadTimeout`, `ReadError`)."""
    raw = resp.aiter_raw()  # held to the end: dropping it would close the response under us
    left = _direct_length(resp)
    if left is None:
        async for chunk in raw:
            yield chunk
        return
    if left > 0:
        async for chunk in raw:  # h11's first piece; nothing of the body stays buffered in it
            left -= len(chunk)
            yield chunk
            break
    stream = resp.extensions["network_stream"]
    while left > 0:
        try:
            chunk = await stream.read(min(READ_BYTES, left), timeout=read_timeout)
        except httpcore.TimeoutException as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=resp.request) from exc
        except httpcore.NetworkError as exc:
            raise httpx.ReadError(str(exc) or "connection lost", request=resp.request) from exc
        if not chunk:
            return  # the peer closed early: the caller counts what it got
        left -= len(chunk)
        yield chunk
