"""The routing table: live workers, their load, and how the queen learns that one died.

A worker enters the table only after answering `/v1/ready` with 200 to its own key
(registration and cold start alike), and leaves it as soon as it refuses
connections, reports it is draining or failed, or misses three probes in a row.
Probes run on a timer and, at once, after any request to the worker went wrong, so
a dead worker costs one failed attempt, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from rbee_worker.protocol.client import WorkerClient, WorkerReady
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.queen_api import QueenWorker

from .fleet import ModelEntry, WorkerEntry
from .metrics import QueenMetrics

log = logging.getLogger("rbee.queen")

PROBE_TIMEOUT = 5.0
MAX_PROBE_FAILURES = 3


@dataclass(eq=False)
class RoutedWorker:
    entry: WorkerEntry
    slots: int = 1
    owned: bool = False
    meta: ModelEntry | None = None
    in_flight: int = 0
    last_used: float = 0.0
    failures: int = 0
    served: int = 0
    added_at: float = field(default_factory=time.time)
    #: the same moment on the monotonic clock `last_used` is read from (idle replicas)
    joined_at: float = field(default_factory=time.monotonic)
    #: the device it runs on, when its registration said
    backend: str | None = None
    device: int | None = None
    vram_bytes: int | None = None
    #: serves `/v1/embeddings`, not generation (its `/v1/ready` says)
    embedding: bool = False

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def node(self) -> str:
        return self.entry.node

    @property
    def model(self) -> str:
        return self.entry.model

    @property
    def url(self) -> str:
        return self.entry.url

    @property
    def capacity(self) -> int:
        return max(1, self.slots)

    def client(self, http: httpx.AsyncClient) -> WorkerClient:
        return WorkerClient(self.url, self.entry.api_key, http)

    def public(self) -> QueenWorker:
        """What `/v2/workers/list` shows: everything but the key."""
        return QueenWorker(
            id=self.id,
            node=self.node,
            model=self.model,
            url=self.url,
            slots=self.slots,
            in_flight=self.in_flight,
            served=self.served,
            owned=self.owned,
            failures=self.failures,
            added_at=round(self.added_at, 3),
            backend=self.backend,
            device=self.device,
            vram_bytes=self.vram_bytes,
            embedding=self.embedding,
        )


def worker_unreachable(entry: WorkerEntry, exc: Exception) -> RbeeError:
    return RbeeError(
        ErrorCode.WORKER_CRASHED,
        f"worker {entry.id} at {entry.url} is unreachable: {type(exc).__name__}",
        details={"worker": entry.id, "node": entry.node, "dead": isinstance(exc, httpx.ConnectError)},
    )


async def probe_ready(
    client: httpx.AsyncClient, entry: WorkerEntry, timeout: float = PROBE_TIMEOUT
) -> WorkerReady:
    """The worker's readiness when it is ready; RbeeError (details.dead when refused) otherwise."""
    try:
        ready = await WorkerClient(entry.url, entry.api_key, client).ready(timeout=timeout)
    except httpx.HTTPError as exc:
        raise worker_unreachable(entry, exc) from None
    except RbeeError as exc:
        if exc.status != 401:
            raise
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"worker at {entry.url} refused the api key the queen holds for it",
            details={"worker": entry.id, "field": "api_key"},
        ) from None
    if ready.http_status == 200 and ready.state is not None:
        return ready
    state = ready.state
    raise RbeeError(
        ErrorCode.MODEL_LOADING if state == "loading" else ErrorCode.WORKER_CRASHED,
        f"worker at {entry.url} is not ready (HTTP {ready.http_status}, state {state})",
        status=503,
        details={"worker": entry.id, "state": state, "dead": state in ("failed", "draining")},
    )


class TableListener(Protocol):
    def worker_added(self, worker: RoutedWorker) -> None: ...

    def worker_removed(self, worker: RoutedWorker) -> None: ...


class WorkerTable:
    def __init__(self, client: httpx.AsyncClient, metrics: QueenMetrics) -> None:
        self._client = client
        self._metrics = metrics
        self._workers: dict[str, RoutedWorker] = {}
        self._probing: dict[str, asyncio.Task[None]] = {}
        self.listener: TableListener | None = None

    def __iter__(self) -> Iterator[RoutedWorker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> RoutedWorker | None:
        return self._workers.get(worker_id)

    def find_url(self, url: str) -> RoutedWorker | None:
        return next((w for w in self._workers.values() if w.url == url), None)

    def is_live(self, worker: RoutedWorker) -> bool:
        return self._workers.get(worker.id) is worker

    def add(self, worker: RoutedWorker) -> RoutedWorker:
        """Add, or replace the entry with the same id (running requests finish on the old entry)."""
        old = self._workers.get(worker.id)
        if old is not None:
            self._drop(old, "replaced")
        self._workers[worker.id] = worker
        self._count(worker)
        log.info("worker %s joined: %s on %s at %s", worker.id, worker.model, worker.node, worker.url)
        if self.listener is not None:
            self.listener.worker_added(worker)
        return worker

    def remove(self, worker: RoutedWorker, reason: str) -> bool:
        if not self.is_live(worker):
            return False
        self._drop(worker, reason)
        if self.listener is not None:
            self.listener.worker_removed(worker)
        return True

    def _drop(self, worker: RoutedWorker, reason: str) -> None:
        del self._workers[worker.id]
        self._count(worker)
        log.warning("worker %s left the routing table: %s", worker.id, reason)

    def _count(self, worker: RoutedWorker) -> None:
        n = sum(1 for w in self._workers.values() if w.model == worker.model and w.node == worker.node)
        self._metrics.workers.labels(worker.model, worker.node).set(n)

    async def check(self, entry: WorkerEntry) -> WorkerReady:
        """Probe a worker that is not in the table yet (registration, cold start)."""
        return await probe_ready(self._client, entry)

    def suspect(self, worker: RoutedWorker, error: RbeeError | None = None) -> None:
        """A request to `worker` failed: drop it now if it is certainly dead, else probe it soon."""
        if error is not None and error.details.get("dead"):
            self.remove(worker, error.message)
            return
        if worker.id not in self._probing and self.is_live(worker):
            task = asyncio.create_task(self.probe(worker))
            self._probing[worker.id] = task
            task.add_done_callback(lambda _t: self._probing.pop(worker.id, None))

    async def probe(self, worker: RoutedWorker) -> None:
        try:
            ready = await probe_ready(self._client, worker.entry)
        except RbeeError as exc:
            worker.failures += 1
            if exc.details.get("dead") or worker.failures >= MAX_PROBE_FAILURES:
                self.remove(worker, exc.message)
            return
        worker.failures = 0
        if ready.slots is not None:
            worker.slots = ready.slots

    async def health_loop(self, interval: float) -> None:
        """Probe every worker every `interval` seconds, all at once."""
        while True:
            await asyncio.sleep(interval)
            workers = list(self)
            if workers:
                await asyncio.gather(*(self.probe(w) for w in workers), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._probing.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
