"""The daemon's in-memory view of its workers.

Workers are ephemeral, so the registry is not persisted: what survives a hive
restart is the per-worker file (`pidfiles.WorkerFile`), and the registry is
rebuilt from those only after each worker proves it is alive.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import WorkerInfo

from .pidfiles import WorkerFile


class WorkerState(StrEnum):
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"


@dataclass(eq=False)
class Worker:
    file: WorkerFile
    state: WorkerState = WorkerState.LOADING
    last_activity: float = field(default_factory=time.time)
    ready_at: float | None = None
    failed_probes: int = 0
    slots_busy: int = 0
    #: set when the worker leaves `loading`, either way; `error` says which
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    error: dict[str, Any] | None = None
    #: our own child (None for a worker adopted after a hive restart)
    process: asyncio.subprocess.Process | None = None
    idle_timeout: float | None = None

    @property
    def id(self) -> str:
        return self.file.id

    @property
    def url(self) -> str:
        return self.file.url

    def idle_for(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.last_activity)

    def info(self) -> WorkerInfo:
        """The wire form for the keeper; it carries the API key because only the socket's owner can ask."""
        f = self.file
        return WorkerInfo(
            id=f.id,
            url=f.url,
            model=f.model,
            state=str(self.state),
            runtime=f.runtime,
            backend=f.backend,
            device=f.device,
            gpu_layers=f.gpu_layers,
            vram_bytes=f.vram_bytes,
            planned_bytes=f.planned_bytes,
            pid=f.pid,
            port=f.port,
            slots=f.slots,
            slots_busy=self.slots_busy,
            api_key=f.api_key,
            started_at=f.started_at,
            ready_at=self.ready_at,
            last_activity=round(self.last_activity, 3),
            idle_seconds=round(self.idle_for(), 1) if self.state == WorkerState.IDLE else 0.0,
            failed_probes=self.failed_probes,
            rpc_servers=list(f.rpc_servers),
            embedding=f.embedding,
        )


class Registry:
    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}

    def add(self, worker: Worker) -> None:
        self._workers[worker.id] = worker

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def require(self, worker_id: str) -> Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise RbeeError(
                ErrorCode.WORKER_NOT_FOUND,
                f"no worker {worker_id!r} on this node",
                details={"id": worker_id},
                hint="rbee-hive worker list",
            )
        return worker

    def remove(self, worker_id: str) -> Worker | None:
        return self._workers.pop(worker_id, None)

    def list(self) -> list[Worker]:
        return sorted(self._workers.values(), key=lambda w: w.file.started_at)

    def ports(self) -> set[int]:
        return {w.file.port for w in self._workers.values()}

    def __len__(self) -> int:
        return len(self._workers)
