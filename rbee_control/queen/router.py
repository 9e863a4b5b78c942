"""Pick a worker for each request: least busy first, a bounded queue, one cold start per model.

- The queen counts requests in flight per worker and sends a worker at most as
  many as it has slots. Extra requests wait *in the queen*, not in one worker's
  queue, so whichever worker frees up first serves the oldest waiter (FIFO
  handoff: a finishing request passes its lease straight to the next waiter that
  can use that worker, so newcomers cannot overtake).
- The wait is bounded twice: at most `queue_limit` requests wait per model, each
  at most `queue_timeout` seconds; beyond either the client gets 503
  ALL_SLOTS_BUSY with `Retry-After` at once instead of a hung connection.
- When no worker serves the model, the fleet is asked to start one while the
  client waits (at most `cold_start_timeout`). Concurrent requests for the same
  cold model share one spawn; a failed spawn is remembered for a few seconds so
  a burst of requests does not become a burst of SSH commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .catalog import Target
from .fleet import Fleet
from .metrics import QueenMetrics
from .replicas import Replicas, ReplicaSettings, placement_of
from .workers import RoutedWorker, WorkerTable

log = logging.getLogger("rbee.queen")

RETRY_AFTER_SECONDS = 2
SPAWN_FAILURE_MEMORY = 5.0


@dataclass(frozen=True, slots=True)
class RouterSettings:
    queue_limit: int = 64
    queue_timeout: float = 120.0
    cold_start_timeout: float = 600.0
    replicas: ReplicaSettings = field(default_factory=ReplicaSettings)


@dataclass(eq=False)
class Lease:
    """One request's claim on one worker's slot; release exactly once (idempotent)."""

    worker: RoutedWorker
    router: Router
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.router.release_worker(self.worker)


@dataclass(eq=False)
class _Waiter:
    target: Target
    exclude: frozenset[str]
    future: asyncio.Future[RoutedWorker | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _serves(worker: RoutedWorker, target: Target) -> bool:
    return (
        worker.model == target.model
        and (target.node is None or worker.node == target.node)
        and worker.embedding == target.embedding
    )


def busy_error(target: Target, why: str) -> RbeeError:
    return RbeeError(
        ErrorCode.ALL_SLOTS_BUSY,
        f"every worker for {target.public_id} is busy ({why}); retry later",
        details={"model": target.public_id, "retry_after": RETRY_AFTER_SECONDS},
    )


class Router:
    def __init__(
        self, fleet: Fleet, table: WorkerTable, metrics: QueenMetrics, settings: RouterSettings
    ) -> None:
        self.fleet = fleet
        self.table = table
        self.metrics = metrics
        self.settings = settings
        self._waiters: deque[_Waiter] = deque()
        self._cold_waiting: dict[str, int] = {}
        #: cold starts by (model, node, embedding)
        self._spawning: dict[tuple[str, str, bool], asyncio.Task[RoutedWorker]] = {}
        self._spawn_failed: dict[tuple[str, str, bool], tuple[float, RbeeError]] = {}
        self.replicas = Replicas(self, settings.replicas)
        table.listener = self

    # --- acquiring -----------------------------------------------------------

    async def acquire(self, target: Target, exclude: frozenset[str] = frozenset()) -> Lease | None:
        """A lease on a worker serving `target`, waiting or cold-starting as needed.

        None when workers exist but every one of them is in `exclude` (they already
        failed this request); the caller then reports its last error.
        """
        deadline = time.monotonic() + self.settings.queue_timeout
        while True:
            serving = [w for w in self.table if _serves(w, target)]
            candidates = [w for w in serving if w.id not in exclude]
            if candidates:
                free = [w for w in candidates if w.in_flight < w.capacity]
                if free:
                    worker = min(free, key=lambda w: (w.in_flight / w.capacity, w.last_used))
                    worker.in_flight += 1
                    return self._lease(worker)
                waited = await self._wait(target, exclude, deadline)
                if waited is not None:
                    return self._lease(waited)
                continue
            if serving:
                return None
            await self._cold_start(target)
            deadline = time.monotonic() + self.settings.queue_timeout  # the queue wait starts now

    def _lease(self, worker: RoutedWorker) -> Lease:
        worker.last_used = time.monotonic()
        worker.served += 1
        self.metrics.in_flight.labels(worker.model, worker.node).set(worker.in_flight)
        return Lease(worker, self)

    def _queued(self, model: str) -> int:
        return sum(1 for w in self._waiters if w.target.model == model) + self._cold_waiting.get(model, 0)

    def _update_depth(self, model: str) -> None:
        self.metrics.queue_depth.labels(model).set(self._queued(model))

    async def _wait(self, target: Target, exclude: frozenset[str], deadline: float) -> RoutedWorker | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise busy_error(target, f"waited {self.settings.queue_timeout:g} s")
        if self._queued(target.model) >= self.settings.queue_limit:
            raise busy_error(target, f"{self.settings.queue_limit} requests already waiting")
        waiter = _Waiter(target, exclude)
        self._waiters.append(waiter)
        self._update_depth(target.model)
        try:
            scale_after = self.settings.replicas.scale_after
            try:
                await asyncio.wait_for(asyncio.shield(waiter.future), min(remaining, scale_after))
            except TimeoutError:
                if remaining <= scale_after:
                    raise
                self.replicas.pressure(target, f"a request waited {scale_after:g} s")
                await asyncio.wait_for(asyncio.shield(waiter.future), remaining - scale_after)
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise busy_error(target, f"waited {self.settings.queue_timeout:g} s") from None
            raise
        return waiter.future.result()

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up (timeout, disconnect); a slot handed to it meanwhile goes to the next one."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if waiter.future.done():
            worker = waiter.future.result()
            if worker is not None:
                self.release_worker(worker)
        else:
            waiter.future.cancel()
        self._update_depth(waiter.target.model)

    # --- releasing and table changes -----------------------------------------

    def release_worker(self, worker: RoutedWorker) -> None:
        """A request finished: hand the slot to the oldest waiter that can use it, or free it."""
        if self.table.is_live(worker):
            for waiter in self._waiters:
                if (
                    not waiter.future.done()
                    and _serves(worker, waiter.target)
                    and worker.id not in waiter.exclude
                ):
                    self._waiters.remove(waiter)
                    waiter.future.set_result(worker)
                    self._update_depth(waiter.target.model)
                    return
        worker.in_flight = max(0, worker.in_flight - 1)
        self.metrics.in_flight.labels(worker.model, worker.node).set(worker.in_flight)

    def worker_added(self, worker: RoutedWorker) -> None:
        for waiter in list(self._waiters):
            if worker.in_flight >= worker.capacity:
                break
            if (
                not waiter.future.done()
                and _serves(worker, waiter.target)
                and worker.id not in waiter.exclude
            ):
                self._waiters.remove(waiter)
                worker.in_flight += 1
                waiter.future.set_result(worker)
                self._update_depth(waiter.target.model)

    def worker_removed(self, worker: RoutedWorker) -> None:
        """Waiters left with no usable worker re-evaluate now (cold start or give up), not at timeout."""
        for waiter in list(self._waiters):
            if waiter.future.done() or not _serves(worker, waiter.target):
                continue
            if not any(_serves(w, waiter.target) and w.id not in waiter.exclude for w in self.table):
                self._waiters.remove(waiter)
                waiter.future.set_result(None)
                self._update_depth(waiter.target.model)

    # --- cold start ------------------------------------------------------------

    def _pick_node(self, target: Target) -> str:
        if target.node is not None:
            return target.node
        if not target.nodes:
            return "-"
        preferred = placement_of(self.fleet, target.model).node
        if preferred in target.nodes:
            return preferred
        load = {node: 0 for node in target.nodes}
        for worker in self.table:
            if worker.node in load:
                load[worker.node] += 1
        return min(target.nodes, key=lambda n: load[n])

    async def _cold_start(self, target: Target) -> None:
        key = (target.model, self._pick_node(target), target.embedding)
        failed = self._spawn_failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < SPAWN_FAILURE_MEMORY:
            raise failed[1]
        if self._queued(target.model) >= self.settings.queue_limit:
            raise busy_error(target, f"{self.settings.queue_limit} requests already waiting")
        task = self._spawning.get(key)
        if task is None:
            task = asyncio.create_task(self._spawn(*key))
            self._spawning[key] = task
            task.add_done_callback(lambda _t: self._spawning.pop(key, None))
        self._cold_waiting[target.model] = self._cold_waiting.get(target.model, 0) + 1
        self._update_depth(target.model)
        try:
            async with asyncio.timeout(self.settings.cold_start_timeout):
                await asyncio.shield(task)
        except TimeoutError:
            raise RbeeError(
                ErrorCode.LOADING_TIMEOUT,
                f"no worker for {target.public_id} became ready "
                f"within {self.settings.cold_start_timeout:g} s",
                status=503,
                details={"model": target.public_id, "retry_after": RETRY_AFTER_SECONDS},
            ) from None
        finally:
            self._cold_waiting[target.model] -= 1
            self._update_depth(target.model)

    async def _spawn(self, model: str, node: str, embedding: bool = False) -> RoutedWorker:
        started = time.monotonic()
        log.info("cold start: %s on %s%s", model, node, " for embeddings" if embedding else "")
        try:
            if embedding:
                entry = await self.fleet.spawn(model, node, embedding=True)
            else:
                entry = await self.fleet.spawn(model, node)
            try:
                ready = await self.table.check(entry)
            except RbeeError:
                with contextlib.suppress(Exception):
                    await self.fleet.stop_worker(entry)
                raise
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, RbeeError)
                else RbeeError(
                    ErrorCode.INTERNAL_ERROR,
                    f"starting {model} on {node} failed: {type(exc).__name__}: {exc}",
                )
            )
            self._spawn_failed[(model, node, embedding)] = (time.monotonic(), error)
            self.metrics.cold_starts.labels(model, node, "error").inc()
            log.error("cold start of %s on %s failed: %s", model, node, error.message)
            raise error from None
        self._spawn_failed.pop((model, node, embedding), None)
        worker = RoutedWorker(entry, slots=ready.slots or 1, owned=True, embedding=ready.embedding)
        self.metrics.cold_starts.labels(model, node, "ok").inc()
        self.metrics.cold_start_seconds.labels(model).observe(time.monotonic() - started)
        self.table.add(worker)
        return worker

    # --- replicas ------------------------------------------------------------------

    def spawning_keys(self) -> list[tuple[str, str]]:
        """(model, node) of every start under way."""
        return [(model, node) for model, node, _embedding in self._spawning]

    def start_replica(
        self, model: str, node: str, embedding: bool = False
    ) -> asyncio.Task[RoutedWorker] | None:
        """One more worker for `model` on `node` (joining a start there already under way).

        Registered at once, so the next waiter that asks sees it counted; None when a
        start there failed moments ago.
        """
        key = (model, node, embedding)
        failed = self._spawn_failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < SPAWN_FAILURE_MEMORY:
            return None
        task = self._spawning.get(key)
        if task is None:
            task = asyncio.create_task(self._spawn(model, node, embedding))
            self._spawning[key] = task
            task.add_done_callback(lambda _t: self._spawning.pop(key, None))
        return task

    async def retire(self, worker: RoutedWorker) -> None:
        """Out of the table first (no new request reaches it), then stopped on its node."""
        if self.table.remove(worker, "idle replica retired"):
            await self.fleet.stop_worker(worker.entry)

    async def close(self) -> None:
        """Abandon cold starts still in progress (the queen is exiting; nobody will use them)."""
        await self.replicas.close()
        tasks = list(self._spawning.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
