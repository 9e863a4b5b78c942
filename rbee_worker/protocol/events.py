"""The inference SSE stream: event names, payload shapes, encoder and parser.

A stream is `started` → `token`* → exactly one of `end` | `error` → `data: [DONE]`.
The worker encodes with `encode_event`; the keeper and the queen decode with
`EventParser` (through `iter_events` or `iter_event_batches`), so both sides
share one definition of the format.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .jsontext import dumps

STARTED = "started"
TOKEN = "token"
END = "end"
ERROR = "error"
PROGRESS = "progress"
DONE_DATA = "[DONE]"

STOP_MAX_TOKENS = "max_tokens"
STOP_EOS = "eos"
STOP_STOP = "stop"
STOP_CANCELLED = "cancelled"

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream"


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    data: dict[str, Any]


def encode_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {dumps(data)}\n\n".encode()


def encode_comment(text: str = "ping") -> bytes:
    """An SSE comment: clients ignore it, proxies and read timeouts see a live stream."""
    return f": {text}\n\n".encode()


def encode_done() -> bytes:
    return f"data: {DONE_DATA}\n\n".encode()


def token_event(text: str, index: int, logprobs: list[dict[str, Any]] | None = None) -> bytes:
    """`{"t", "i"}`, plus `"lp"` when log-probabilities were asked for: one entry per token of the
    text, `{"token", "bytes", "logprob", "top": [{"token", "bytes", "logprob"}, ...]}`."""
    if logprobs is None:
        return encode_event(TOKEN, {"t": text, "i": index})
    return encode_event(TOKEN, {"t": text, "i": index, "lp": logprobs})


#: Parsed events with the exact bytes each came in, in stream order.
Batch = list[tuple[bytes, Event]]


class EventParser:
    """Incremental SSE parser: feed bytes as they arrive, get whole events back with their exact bytes.

    Parsing a network read at once (rather than line by line through async
    iterators) is what lets a relay handle thousands of events per second cheaply;
    the exact bytes make a byte-for-byte passthrough possible. After `[DONE]`
    everything is ignored and `done` is true.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._cr = b""  # a chunk's last byte when it was a CR: its LF may come in the next chunk
        self.done = False

    def feed(self, chunk: bytes) -> Batch:
        if self.done:
            return []
        chunk, self._cr = self._cr + chunk, b""
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        parsed: Batch = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            raw = buffer[start : end + 2]
            start = end + 2
            event = _parse_block(raw)
            if event is _DONE:
                self.done = True
                start = len(buffer)
                break
            if event is not None:
                parsed.append((raw, event))
        self._buffer = buffer[start:]
        return parsed

    def close(self) -> Batch:
        """The stream ended: a last event not followed by a blank line still counts."""
        rest = self._buffer + (b"\n" if self._cr else b"")
        self._buffer, self._cr = b"", b""
        return self.feed(rest + b"\n\n") if rest.strip() else []


_DONE = Event("done", {})


def _parse_block(raw: bytes) -> Event | None:
    name = "message"
    data: list[str] = []
    for line in raw.decode().split("\n"):
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
    if not data:
        return None
    payload = "\n".join(data)
    return _DONE if payload == DONE_DATA else Event(name, json.loads(payload))


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    """Events from the body's bytes (`httpx.Response.aiter_bytes()`), up to `[DONE]`.

    Bytes, not `aiter_lines()`: httpx splits lines like `str.splitlines`, also at
    U+2028, U+0085 or U+001C, which JSON leaves unescaped inside token text, while
    SSE ends lines only at CR and LF. What follows `[DONE]` is read and ignored
    rather than abandoned: a body read to its end lets the HTTP client put the
    connection back in its pool instead of closing it.
    """
    async for batch in iter_event_batches(chunks):
        for _raw, event in batch:
            yield event


async def iter_event_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[Batch]:
    """Events as (exact bytes, event), a list per network read that completed any; reads to the end."""
    parser = EventParser()
    async for chunk in chunks:
        if batch := parser.feed(chunk):
            yield batch
    if batch := parser.close():
        yield batch
