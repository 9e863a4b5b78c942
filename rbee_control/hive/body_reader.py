"""A download's body, read straight from the connection once its length is known.

httpx hands a streamed body over in pieces of at most 64 KiB, each through h11's
framing: on loopback that alone held a model download to under half of `curl`'s
speed. A body with a `Content-Length` and no transfer or content coding needs no
framing, so after the first piece (whatever h11 had buffered with the headers) the
rest is read from the connection's own stream (httpcore's `network_stream`
response extension) in 1 MiB reads, up to exactly the declared length. h11 then
never sees the body end, so the connection is closed with the response instead of
going back to the pool — a download has nothing to send on it after.

The reads are blocking, on the downloading thread: the caller hashes each piece
right after the read that brought it in, while it is still in that core's cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpcore
import httpx

#: bytes asked of the connection per read (a read returns what has arrived, up to this)
READ_BYTES = 1 << 20
#: the longest one read blocks, so a stop request is seen within this many seconds
READ_SLICE = 1.0


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


def body_chunks(
    resp: httpx.Response, read_timeout: float | None, stop: threading.Event | None = None
) -> Iterator[bytes]:
    """The raw body as it arrives, until its end or until `stop` is set.

    Errors surface as httpx's: `ReadTimeout` after `read_timeout` seconds without a
    byte, `ReadError` for a broken connection. A peer that closes early just ends
    the iteration; the caller counts what it got.
    """
    stop = stop or threading.Event()
    raw = resp.iter_raw()  # held to the end: dropping it would close the response under us
    left = _direct_length(resp)
    if left is None:
        for chunk in raw:
            yield chunk
            if stop.is_set():
                return
        return
    if left > 0:
        for chunk in raw:  # h11's first piece; nothing of the body stays buffered in it
            left -= len(chunk)
            yield chunk
            break
    stream = resp.extensions["network_stream"]
    last_byte = time.monotonic()
    while left > 0 and not stop.is_set():
        waited = time.monotonic() - last_byte
        if read_timeout is not None and waited >= read_timeout:
            raise httpx.ReadTimeout(f"no byte for {waited:.1f} s", request=resp.request)
        slice_ = READ_SLICE if read_timeout is None else min(READ_SLICE, read_timeout - waited)
        try:
            chunk = stream.read(min(READ_BYTES, left), timeout=slice_)
        except httpcore.TimeoutException:
            continue  # the stall clock above decides when waiting has become a failure
        except httpcore.NetworkError as exc:
            raise httpx.ReadError(str(exc) or "connection lost", request=resp.request) from exc
        if not chunk:
            return
        last_byte = time.monotonic()
        left -= len(chunk)
        yield chunk
