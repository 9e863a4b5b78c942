"""What the queen needs from a control plane: which models exist where, and workers on demand.

The router never talks SSH or hive commands itself; it asks a `Fleet`. That keeps
routing testable against real worker processes without nodes, and lets the same
queen run in two modes:

- `StaticFleet`: no control plane. Workers join through `POST /v2/workers/register`
  and the models on offer are exactly what registered workers serve (the queen
  adds those to its catalog itself, so this fleet lists nothing and spawns
  nothing). Nothing is started, so nothing is stopped.
- `InventoryFleet` (`inventory_fleet.py`): every node of the inventory, reached
  over SSH (or locally) through its hive: catalogs listed concurrently, workers
  spawned on a cold start and stopped again when the queen exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rbee_worker.protocol.errors import ErrorCode, RbeeError


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One model file in one node's catalog, with what the queen needs to build prompts.

    `digest` (the file's sha256 when known) tells "the same model on two nodes" apart
    from "two different files that happen to share a name"; None means unknown. The
    file's size, architecture, quantization and catalog time describe it to clients
    (Ollama's `/api/tags` and `/api/show`); None when the source does not say.
    """

    name: str
    node: str
    context_length: int | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    digest: str | None = None
    size: int | None = None
    architecture: str | None = None
    quantization: str | None = None
    modified_at: float | None = None


@dataclass(frozen=True, slots=True)
class WorkerEntry:
    """A worker reachable over HTTP; `api_key` is held by the queen and never shown."""

    id: str
    node: str
    url: str
    api_key: str
    model: str

    def __repr__(self) -> str:  # keep keys out of logs and tracebacks
        return f"WorkerEntry(id={self.id!r}, node={self.node!r}, url={self.url!r}, model={self.model!r})"


@runtime_checkable
class Fleet(Protocol):
    """The control plane as the router sees it; every method is safe to call concurrently."""

    async def list_models(self) -> list[ModelEntry]:
        """Every model the fleet could serve (loaded or not)."""
        ...

    async def spawn(self, model: str, node: str, *, embedding: bool = False) -> WorkerEntry:
        """Start a worker for `model` on `node` (one for embeddings with `embedding`); return it once
        it answers `/v1/ready`. The router passes `embedding` only when it is true."""
        ...

    async def stop_worker(self, entry: WorkerEntry) -> None:
        """Stop a worker this fleet spawned."""
        ...

    async def close(self) -> None:
        """Stop everything this fleet started, and only that; bounded in time by the caller."""
        ...


class StaticFleet:
    """No control plane: models and workers come only from registrations."""

    async def list_models(self) -> list[ModelEntry]:
        return []

    async def spawn(self, model: str, node: str, *, embedding: bool = False) -> WorkerEntry:
        raise RbeeError(
            ErrorCode.WORKER_NOT_FOUND,
            f"no worker serves {model!r} and this queen has no inventory to start one",
            status=503,
            details={"model": model, "node": node, "retry_after": 5},
            hint="register a worker with POST /v2/workers/register, or start the queen with --inventory",
        )

    async def stop_worker(self, entry: WorkerEntry) -> None:
        return None

    async def close(self) -> None:
        return None
