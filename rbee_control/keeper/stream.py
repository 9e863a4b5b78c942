"""Stream one inference from a worker over HTTP/SSE, as `rbee-keeper infer` does.

Busy workers are retried with backoff (honouring Retry-After); a stream that
breaks mid-way keeps the text received so far; cancelling the caller's task
(Ctrl-C) sends DELETE for the request so the worker stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from rbee_worker.protocol import events
from rbee_worker.protocol.client import WorkerClient
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.request import InferenceRequest

#: EC6: a busy worker is asked again 3 times, after 1, 2 and 4 s (its Retry-After doubled each time)
BUSY_RETRIES = 3


@dataclass
class StreamResult:
    request_id: str
    text: list[str] = field(default_factory=list)
    end: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def tokens_out(self) -> int:
        return int(self.end["tokens_out"]) if self.end else len(self.text)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started_at) * 1000

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_token_at is None or self.finished_at is None or self.tokens_out < 2:
            return None
        elapsed = self.finished_at - self.first_token_at
        return (self.tokens_out - 1) / elapsed if elapsed > 0 else None


async def stream_inference(
    worker: WorkerClient,
    request: InferenceRequest,
    on_text: Callable[[str], None],
    *,
    on_busy: Callable[[float], None] | None = None,
    busy_retries: int = BUSY_RETRIES,
) -> StreamResult:
    """Stream `request` from `worker`, calling `on_text` per piece as it arrives."""
    result = StreamResult(request_id=uuid.uuid4().hex)
    for attempt in range(busy_retries + 1):
        try:
            await _stream_once(worker, request, on_text, result)
            return result
        except RbeeError as exc:
            if exc.code != ErrorCode.ALL_SLOTS_BUSY or result.text:
                raise
            if attempt == busy_retries:
                raise RbeeError(
                    ErrorCode.ALL_SLOTS_BUSY,
                    f"Worker still busy after {busy_retries} retries",
                    status=503,
                    details={**exc.details, "attempts": attempt + 1, "url": worker.url},
                    hint="wait for the current request to complete or use a different node (or --retry N)",
                ) from None
            delay = min(8.0, float(exc.details.get("retry_after", 1)) * (2**attempt))
            if on_busy:
                on_busy(delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _stream_once(
    worker: WorkerClient,
    request: InferenceRequest,
    on_text: Callable[[str], None],
    result: StreamResult,
) -> None:
    url = worker.url
    try:
        async with await worker.stream(request, result.request_id) as stream:
            # the worker names the request (ours is only a correlation id); cancel uses its name
            result.request_id = stream.request_id
            try:
                async for event in stream.events():
                    if event.name == events.TOKEN:
                        if result.first_token_at is None:
                            result.first_token_at = time.perf_counter()
                        result.text.append(event.data["t"])
                        on_text(event.data["t"])
                    elif event.name == events.END:
                        result.end = event.data
                    elif event.name == events.ERROR:
                        raise RbeeError.from_body({"error": event.data}, 500)
            except asyncio.CancelledError:
                # Cancel while the stream is still open: the worker records a cancel, not a dropped client.
                await _cancel_remote(worker, result.request_id)
                raise
    except httpx.HTTPError as exc:
        raise RbeeError(
            ErrorCode.WORKER_CRASHED,
            f"the worker at {url} stopped answering mid-stream ({type(exc).__name__})",
            details={"url": url, "tokens_received": len(result.text), "partial_text": "".join(result.text)},
        ) from None
    finally:
        result.finished_at = time.perf_counter()
    if result.end is None:
        raise RbeeError(
            ErrorCode.WORKER_CRASHED,
            f"the stream from {url} ended without an end event",
            details={"url": url, "tokens_received": len(result.text), "partial_text": "".join(result.text)},
        )


async def _cancel_remote(worker: WorkerClient, request_id: str) -> None:
    """Best effort, bounded: the worker also stops when it sees the disconnect."""
    with contextlib.suppress(httpx.HTTPError, asyncio.CancelledError, TimeoutError):
        async with asyncio.timeout(2):
            await worker.cancel(request_id)
