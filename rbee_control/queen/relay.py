"""Relay one inference stream from a worker: failover before the first token, honesty after it.

`Relay.open` sends the request to a routed worker and reads until the stream
*commits* (its first `token`, or an `end` with no tokens). Anything that goes
wrong before that — connection refused, a 5xx or 503 busy answer, an `error`
event, a stream that just stops — moves the request to another worker (or a
fresh one, through the router's cold start), up to `max_attempts`; the client
has seen nothing yet, so it gets a normal answer. Only request errors
(400-class: a prompt that does not fit the context, …) go back to the client
as they are.

After the commit the stream is the client's: the events of each network read
from the worker are handed on the moment they arrive, as one batch (no
buffering, and no per-line trips through async iterators at thousands of tokens
per second), and a worker that dies mid-stream becomes a final `error` event,
never silence. Every event comes with its exact bytes, so the native
`/v1/inference` route is a byte-for-byte passthrough. A finished stream is read
to its end so its connection goes back to the pool. Closing an `Upstream` early
(the client went away) closes the worker connection and sends
`DELETE /v1/inference/{id}` so the slot is free within one token, then releases
the lease.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx

from rbee_worker.protocol import events
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.events import Batch, Event
from rbee_worker.protocol.request import InferenceRequest

from .catalog import Target
from .metrics import QueenMetrics
from .router import Lease, Router, busy_error
from .workers import RoutedWorker, WorkerTable, worker_unreachable

log = logging.getLogger("rbee.queen")
access_log = logging.getLogger("rbee.access")

#: Worker answers that are the client's own fault: passed on, never retried elsewhere.
CLIENT_ERROR_STATUSES = frozenset({400, 413, 422})


@dataclass(frozen=True, slots=True)
class RelaySettings:
    max_attempts: int = 4
    cancel_timeout: float = 2.0


class _Retry(Exception):
    def __init__(self, error: RbeeError) -> None:
        super().__init__(error.message)
        self.error = error


def _error_event(error: RbeeError) -> tuple[bytes, Event]:
    data = error.body()["error"]
    return events.encode_event(events.ERROR, data), Event(events.ERROR, data)


def _event_error(event: Event) -> RbeeError:
    code = str(event.data.get("code") or ErrorCode.INFERENCE_FAILED)
    status = 400 if code == ErrorCode.INVALID_REQUEST else 502
    return RbeeError(
        code, str(event.data.get("message", "")), status=status, details=event.data.get("details")
    )


class Upstream:
    """A worker stream that has committed; iterate `batches()` or `events()`, then `aclose()` (always)."""

    def __init__(
        self,
        relay: Relay,
        lease: Lease,
        response: httpx.Response,
        request_id: str,
        stream: AsyncIterator[Batch],
        prefetched: Batch,
    ) -> None:
        self._relay = relay
        self.lease = lease
        self._response = response
        self.request_id = request_id
        self._stream = stream
        self._prefetched = prefetched
        self.terminal: Event | None = None
        self._closed = False
        self._opened = time.monotonic()

    @property
    def worker(self) -> RoutedWorker:
        return self.lease.worker

    async def batches(self) -> AsyncIterator[Batch]:
        """Lists of (exact bytes, parsed event) as they arrive, up to and including one `end` or `error`."""
        prefetched, self._prefetched = self._prefetched, []
        if prefetched:
            yield self._up_to_terminal(prefetched)
        if self.terminal is not None:
            return
        try:
            async for batch in self._stream:
                yield self._up_to_terminal(batch)
                if self.terminal is not None:
                    return
        except httpx.HTTPError as exc:
            self._relay.table.suspect(self.worker, worker_unreachable(self.worker.entry, exc))
            yield [self._fail(f"{type(exc).__name__} mid-stream")]
            return
        self._relay.table.suspect(self.worker)
        yield [self._fail("the stream ended without an end event")]

    async def events(self) -> AsyncIterator[tuple[bytes, Event]]:
        """`batches()`, one event at a time."""
        async for batch in self.batches():
            for item in batch:
                yield item

    def _up_to_terminal(self, batch: Batch) -> Batch:
        for index, (_raw, event) in enumerate(batch):
            if event.name in (events.END, events.ERROR):
                self.terminal = event
                # The worker freed its slot before it wrote `end`: the next queued request
                # can go now, not after this client has read the rest.
                self.lease.release()
                return batch[: index + 1]
        return batch

    def _fail(self, why: str) -> tuple[bytes, Event]:
        worker = self.worker
        error = RbeeError(
            ErrorCode.WORKER_CRASHED,
            f"worker {worker.id} on {worker.node} failed after the first token ({why})",
            details={"worker": worker.id, "node": worker.node},
        )
        raw, event = _error_event(error)
        self.terminal = event
        return raw, event

    async def aclose(self) -> None:
        """Stop the generation if it is still running, free the connection, release the lease."""
        if self._closed:
            return
        self._closed = True
        self._access()
        try:
            if self.terminal is None:
                await self._relay.cancel(self.worker, self._response, self.request_id)
            else:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._relay.settings.cancel_timeout):
                    # the rest is `[DONE]` and the body's end: reading it keeps the connection reusable
                    with contextlib.suppress(httpx.HTTPError):
                        async for _batch in self._stream:
                            pass
                    await self._response.aclose()
        finally:
            self.lease.release()

    def _access(self) -> None:
        """One line per relayed request (the worker logs its own): who served it and how it ended."""
        end = self.terminal.data if self.terminal is not None and self.terminal.name == events.END else {}
        cancelled = self.terminal is None or end.get("stop_reason") == events.STOP_CANCELLED
        status = "ok" if end else "cancelled" if self.terminal is None else "error"
        access_log.info(
            "request_id=%s model=%s worker=%s node=%s tokens_in=%s tokens_out=%s ttft_ms=%s duration_ms=%.1f "
            "status=%s cancelled=%s",
            self.request_id, self.worker.model, self.worker.id, self.worker.node,
            end.get("prompt_tokens", "-"), end.get("tokens_out", "-"), end.get("ttft_ms", "-"),
            (time.monotonic() - self._opened) * 1000,
            status, str(cancelled).lower(),
        )  # fmt: skip


class Relay:
    def __init__(
        self,
        router: Router,
        client: httpx.AsyncClient,
        metrics: QueenMetrics,
        settings: RelaySettings = RelaySettings(),
    ) -> None:
        self.router = router
        self.table: WorkerTable = router.table
        self.client = client
        self.metrics = metrics
        self.settings = settings

    async def open(self, target: Target, request: InferenceRequest, request_id: str) -> Upstream:
        """A committed stream from some worker serving `target`, or the error that explains why not."""
        exclude: set[str] = set()
        last: RbeeError | None = None
        for _attempt in range(self.settings.max_attempts):
            lease = await self.router.acquire(target, frozenset(exclude))
            if lease is None:
                break
            try:
                return await self._start(lease, request, request_id)
            except _Retry as retry:
                lease.release()
                worker, last = lease.worker, retry.error
                exclude.add(worker.id)
                if retry.error.code == ErrorCode.ALL_SLOTS_BUSY:
                    self.router.replicas.pressure(target, "a worker answered ALL_SLOTS_BUSY")
                self.table.suspect(worker, retry.error)
                self.metrics.retries.labels(target.model).inc()
                self.metrics.errors.labels(retry.error.code).inc()
                log.warning("request %s: worker %s failed before the first token: %s",
                            request_id, worker.id, retry.error.message)  # fmt: skip
            except BaseException:
                lease.release()
                raise
        raise last or busy_error(target, "no worker accepted the request")

    async def _start(self, lease: Lease, request: InferenceRequest, request_id: str) -> Upstream:
        worker = lease.worker
        queen_id = request_id
        try:
            opened = await worker.client(self.client).stream(request, request_id)
        except httpx.HTTPError as exc:
            raise _Retry(worker_unreachable(worker.entry, exc)) from None
        except RbeeError as refused:
            if refused.status in CLIENT_ERROR_STATUSES:
                raise
            raise _Retry(refused) from None
        response = opened.response
        try:
            # the worker names the generation (ours is its correlation id); DELETE needs its name
            request_id = opened.request_id
            stream = aiter(opened.batches())
            prefetched: Batch = []
            while True:
                try:
                    batch = await anext(stream)
                except StopAsyncIteration:
                    raise _Retry(
                        RbeeError(ErrorCode.WORKER_CRASHED, f"worker {worker.id} ended the stream early")
                    ) from None
                batch = _named_by_queen(batch, queen_id)
                for _raw, event in batch:
                    if event.name in (events.TOKEN, events.END):
                        return Upstream(self, lease, response, request_id, stream, prefetched + batch)
                    if event.name == events.ERROR:
                        error = _event_error(event)
                        if error.status in CLIENT_ERROR_STATUSES:
                            raise error
                        raise _Retry(error)
                prefetched += batch
        except BaseException as exc:
            await self.cancel(worker, response, request_id)
            if isinstance(exc, httpx.HTTPError):
                raise _Retry(worker_unreachable(worker.entry, exc)) from None
            raise

    async def cancel(self, worker: RoutedWorker, response: httpx.Response, request_id: str) -> None:
        """Close the worker stream and DELETE the request, even from a cancelled task; bounded."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.cancel_timeout):
            await response.aclose()
            await self.delete(worker, request_id)

    async def delete(self, worker: RoutedWorker, request_id: str) -> bool:
        """Ask the worker to stop one generation; the stream then ends with `stop_reason: cancelled`."""
        try:
            return await worker.client(self.client).cancel(request_id, timeout=self.settings.cancel_timeout)
        except (httpx.HTTPError, RbeeError):
            return False


def _named_by_queen(batch: Batch, queen_id: str) -> Batch:
    """The worker's `started` carries the worker's id; the client gets the queen's, which it cancels with."""
    out: Batch = []
    for raw, event in batch:
        if event.name == events.STARTED:
            event = events.Event(events.STARTED, {**event.data, "request_id": queen_id})
            raw = events.encode_event(event.name, event.data)
        out.append((raw, event))
    return out
