"""`GET /v2/dashboard`: the fleet in one JSON document, what the web dashboard polls.

Nodes (devices and free memory from each hive's `status`, the same data `rbee-hive
detect` gives), workers (model, busy slots, speed, idle time), models per node and
the last requests. It is on the admin plane: it shows worker URLs and the fleet's
layout, which a client key holder has no need of.

A node's status costs a process start on the node (over SSH), so it is asked for in
the background at most every `NODE_TTL` seconds; a poll never waits on a slow node
longer than `FIRST_WAIT`, it shows what was last known and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbee_control import __version__
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .fleet import Fleet, ModelEntry
from .recent import RecentRequests
from .state import QueenState
from .workers import RoutedWorker

NODE_TTL = 10.0
FIRST_WAIT = 3.0
DEFAULT_REQUESTS = 50


@runtime_checkable
class NodeStatusSource(Protocol):
    """A fleet that can ask its nodes how they are (`InventoryFleet`)."""

    async def node_status(self) -> dict[str, dict[str, Any] | str]: ...


class NodeStatusCache:
    """The nodes' last known status, refreshed in the background when older than `ttl`."""

    def __init__(self, fleet: Fleet, ttl: float = NODE_TTL, first_wait: float = FIRST_WAIT) -> None:
        self._source = fleet if isinstance(fleet, NodeStatusSource) else None
        self._ttl = ttl
        self._first_wait = first_wait
        self._status: dict[str, dict[str, Any] | str] = {}
        self._fetched: float | None = None  # monotonic
        self.checked_at: float | None = None  # wall clock
        self._task: asyncio.Task[None] | None = None

    async def _fetch(self, source: NodeStatusSource) -> None:
        try:
            self._status = await source.node_status()
        finally:
            self._fetched = time.monotonic()
            self.checked_at = time.time()
            self._task = None

    async def get(self) -> tuple[dict[str, dict[str, Any] | str], float | None]:
        """The statuses and when they were taken (None: not yet), read together."""
        if self._source is None:
            return {}, None
        stale = self._fetched is None or time.monotonic() - self._fetched >= self._ttl
        if stale and self._task is None:
            self._task = asyncio.create_task(self._fetch(self._source))
        if self._fetched is None and self._task is not None:
            await asyncio.wait({self._task}, timeout=self._first_wait)
        return self._status, self.checked_at

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


@dataclass(frozen=True, slots=True)
class DeviceView:
    backend: str
    device: int
    name: str
    memory_total_bytes: int | None
    memory_free_bytes: int | None


@dataclass(slots=True)
class NodeView:
    """One node: from its hive's status when the fleet can ask, else from its workers' registrations."""

    name: str
    source: str  # "hive" | "registration"
    error: str | None = None
    hostname: str | None = None
    cpus: int | None = None
    ram_total_bytes: int | None = None
    ram_free_bytes: int | None = None
    hive_running: bool | None = None
    devices: list[DeviceView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: str
    node: str
    model: str
    url: str
    slots: int
    busy: int
    served: int
    owned: bool
    failures: int
    #: seconds since its last request ended (since it joined if it has had none); 0 while busy
    idle_s: float
    #: decode speed of its most recent request that generated tokens
    tokens_per_s: float | None
    backend: str | None
    device: int | None
    vram_bytes: int | None


@dataclass(frozen=True, slots=True)
class ModelView:
    name: str
    node: str
    size_bytes: int | None
    quantization: str | None
    architecture: str | None
    context_length: int | None
    #: a worker serves it on that node now
    loaded: bool


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _device(raw: dict[str, Any]) -> DeviceView:
    return DeviceView(
        backend=str(raw.get("backend", "?")),
        device=_int(raw.get("device")) or 0,
        name=str(raw.get("name", "")),
        memory_total_bytes=_int(raw.get("memory_total_bytes")),
        memory_free_bytes=_int(raw.get("memory_free_bytes")),
    )


def hive_node(name: str, status: dict[str, Any] | str) -> NodeView:
    """A node as its hive's `status` describes it (or the reason it could not be asked)."""
    if isinstance(status, str):
        return NodeView(name, "hive", error=status)
    raw = status.get("node")
    facts: dict[str, Any] = raw if isinstance(raw, dict) else {}
    devices = [_device(d) for d in facts.get("devices", []) if isinstance(d, dict)]
    return NodeView(
        name,
        "hive",
        hostname=facts.get("hostname"),
        cpus=_int(facts.get("cpus")),
        ram_total_bytes=_int(facts.get("ram_total")),
        ram_free_bytes=_int(facts.get("ram_available")),
        hive_running=bool(status.get("running")),
        devices=devices,
    )


def registered_node(name: str, workers: list[RoutedWorker]) -> NodeView:
    """A node the queen knows only through registered workers: their devices, as registered."""
    seen: dict[tuple[str, int], DeviceView] = {}
    for w in workers:
        if w.node == name and w.backend is not None:
            key = (w.backend, w.device or 0)
            seen.setdefault(key, DeviceView(w.backend, w.device or 0, "", w.vram_bytes, None))
    return NodeView(name, "registration", devices=list(seen.values()))


def worker_view(worker: RoutedWorker, recent: RecentRequests, now: float) -> WorkerView:
    if worker.in_flight:
        idle = 0.0
    elif worker.last_used:
        idle = now - worker.last_used
    else:
        idle = time.time() - worker.added_at
    return WorkerView(
        id=worker.id,
        node=worker.node,
        model=worker.model,
        url=worker.url,
        slots=worker.slots,
        busy=worker.in_flight,
        served=worker.served,
        owned=worker.owned,
        failures=worker.failures,
        idle_s=round(max(0.0, idle), 1),
        tokens_per_s=recent.worker_rate(worker.id),
        backend=worker.backend,
        device=worker.device,
        vram_bytes=worker.vram_bytes,
    )


def model_view(entry: ModelEntry, loaded: set[tuple[str, str]]) -> ModelView:
    return ModelView(
        name=entry.name,
        node=entry.node,
        size_bytes=entry.size,
        quantization=entry.quantization,
        architecture=entry.architecture,
        context_length=entry.context_length,
        loaded=(entry.name, entry.node) in loaded,
    )


async def snapshot(state: QueenState, nodes: NodeStatusCache, requests: int) -> dict[str, Any]:
    """The whole document; every list sorted, so a poll that changed nothing reads the same."""
    statuses, checked_at = await nodes.get()
    workers = sorted(state.table, key=lambda w: (w.node, w.model, w.id))
    entries = sorted(await state.catalog.entries(), key=lambda e: (e.node, e.name))
    names = sorted(set(statuses) | {w.node for w in workers} | {e.node for e in entries})
    node_views = [hive_node(n, statuses[n]) if n in statuses else registered_node(n, workers) for n in names]
    now = time.monotonic()
    loaded = {(w.model, w.node) for w in workers}
    return {
        "queen": {
            "version": __version__,
            "started_at": state.started_at,
            "now": time.time(),
            "nodes_checked_at": checked_at,
        },
        "nodes": [asdict(n) for n in node_views],
        "workers": [asdict(worker_view(w, state.recent, now)) for w in workers],
        "models": [asdict(model_view(e, loaded)) for e in entries],
        "requests": [r.to_json() for r in state.recent.latest(requests)],
    }


def _requests_param(request: Request) -> int:
    raw = request.query_params.get("requests", str(DEFAULT_REQUESTS))
    if not raw.isascii() or not raw.isdigit() or not 0 <= int(raw) <= 1000:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"requests: expected a whole number from 0 to 1000, got {raw[:40]!r}",
            details={"field": "requests"},
        )
    return int(raw)


async def dashboard(request: Request) -> Response:
    state: QueenState = request.app.state.queen
    body = await snapshot(state, request.app.state.node_status, _requests_param(request))
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
