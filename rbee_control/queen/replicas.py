"""Replicas on demand: how many workers of a model the queen keeps, adds and retires.

The inventory's `models.<name>.replicas: {min, max}` (default 0 and 1: one worker,
started cold, as before) bounds it:
- `min` workers are kept warm: a loop starts the missing ones;
- under pressure — a request waited `scale_after` seconds for a slot, or a worker
  answered ALL_SLOTS_BUSY — one more is started, up to `max`, on a node that has
  the model and runs none of its workers yet (the least busy one);
- a worker beyond `max(min, 1)` that served nothing for `idle_timeout` seconds is
  stopped again (only workers the queen started itself).
Routing does not change: requests go to the least busy worker, and a new replica
takes the oldest waiter as soon as it joins the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rbee_control.inventory.placements import ModelPlacement

from .catalog import Target
from .workers import RoutedWorker

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger("rbee.queen")


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    #: seconds a request may wait for a slot before another replica is started
    scale_after: float = 2.0
    #: seconds an extra replica may serve nothing before it is stopped
    idle_timeout: float = 300.0
    #: seconds between checks of `min` and of idle extras
    interval: float = 5.0


def placement_of(fleet: Any, model: str) -> ModelPlacement:
    """The fleet's placement for `model` (a fleet without an inventory has only the defaults)."""
    get = getattr(fleet, "placement", None)
    return get(model) if get is not None else ModelPlacement.default(model)


class Replicas:
    def __init__(self, router: Router, settings: ReplicaSettings) -> None:
        self.router = router
        self.settings = settings
        self._tasks: set[asyncio.Task[Any]] = set()

    def serving(self, model: str) -> list[RoutedWorker]:
        return [w for w in self.router.table if w.model == model]

    def _starting(self, model: str) -> int:
        return sum(1 for (m, _node) in self.router.spawning_keys() if m == model)

    def pressure(self, target: Target, why: str) -> None:
        """Requests for `target` are waiting: start one more replica if `max` allows and a node can."""
        if target.node is not None:
            return  # pinned to one node: another node would not serve it
        placement = placement_of(self.router.fleet, target.model)
        count = len(self.serving(target.model)) + self._starting(target.model)
        if count >= placement.max_replicas or placement.split:
            return
        node = self._free_node(target)
        if node is None:
            log.info("%s is busy (%s) but every node that has it (or may fetch it) runs a worker",
                     target.model, why)  # fmt: skip
            return
        log.info("%s is busy (%s): starting replica %d of at most %d on %s",
                 target.model, why, count + 1, placement.max_replicas, node)  # fmt: skip
        task = self.router.start_replica(target.model, node, target.embedding)
        if task is not None:
            self._background(task)

    def _free_node(self, target: Target) -> str | None:
        """The least busy node without a worker of the model: one that has it, else one that can fetch it."""
        used = {w.node for w in self.serving(target.model)}
        used |= {n for (m, n) in self.router.spawning_keys() if m == target.model}
        free = [n for n in target.nodes if n not in used]
        if not free and placement_of(self.router.fleet, target.model).source is not None:
            names = getattr(self.router.fleet, "node_names", None)
            free = [n for n in (names() if names is not None else []) if n not in used]
        if not free:
            return None
        load = {n: sum(w.in_flight for w in self.router.table if w.node == n) for n in free}
        return min(free, key=lambda n: load[n])

    async def loop(
        self, resolve: Callable[[str], Awaitable[Target]], models: Callable[[], list[str]]
    ) -> None:
        """Keep `min` warm and retire idle extras, every `interval` seconds."""
        while True:
            await asyncio.sleep(self.settings.interval)
            try:
                await self.step(resolve, models())
            except Exception:
                log.exception("replica check failed")

    async def step(self, resolve: Callable[[str], Awaitable[Target]], models: list[str]) -> None:
        for model in models:
            placement = placement_of(self.router.fleet, model)
            missing = placement.min_replicas - len(self.serving(model)) - self._starting(model)
            if missing > 0:
                target = await resolve(model)
                for _ in range(missing):
                    self.pressure(target, f"min {placement.min_replicas}")
        self.retire_idle()

    def retire_idle(self) -> None:
        """Stop extras idle past the timeout, newest first.

        Idle counts from a worker's last request, and at the earliest from the
        model's latest new replica: one that was just paid for with a cold start
        keeps its siblings too, or the burst that asked for it would lose a worker.
        """
        now = time.monotonic()
        for model in {w.model for w in self.router.table}:
            placement = placement_of(self.router.fleet, model)
            workers = self.serving(model)
            extra = len(workers) - max(placement.min_replicas, 1)
            if extra <= 0:
                continue
            newest = max(w.joined_at for w in workers)
            idle = {w.id: now - max(w.last_used, newest) for w in workers}
            retirable = [
                w for w in workers if w.owned and w.in_flight == 0 and idle[w.id] > self.settings.idle_timeout
            ]
            for worker in sorted(retirable, key=lambda w: -w.joined_at)[:extra]:
                log.info(
                    "retiring replica %s of %s on %s: idle %.0f s",
                    worker.id,
                    model,
                    worker.node,
                    idle[worker.id],
                )
                self._background(self.router.retire(worker))

    def _background(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("replica change failed: %s", task.exception())

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
