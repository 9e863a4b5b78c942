"""The inference SSE stream: event names, payload shapes, encoder and parser.

A stream is `started` → `token`* → exactly one of `end` | `error` → `data: [DONE]`.
The worker encodes with `encode_event`; the keeper and the queen decode with
`iter_events`, so both sides share one definition of the format.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

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
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def encode_done() -> bytes:
    return f"data: {DONE_DATA}\n\n".encode()


def token_event(text: str, index: int) -> bytes:
    return encode_event(TOKEN, {"t": text, "i": index})


async def iter_events(lines: AsyncIterator[str]) -> AsyncIterator[Event]:
    """Parse SSE lines (as from `httpx.Response.aiter_lines`) into events; stops at `[DONE]`."""
    name = "message"
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if line == "":
            if data:
                payload = "\n".join(data)
                if payload == DONE_DATA:
                    return
                yield Event(name, json.loads(payload))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data and "\n".join(data) != DONE_DATA:
        yield Event(name, json.loads("\n".join(data)))
