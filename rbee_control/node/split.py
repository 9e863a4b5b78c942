"""One model over several nodes: RPC servers on the helper nodes, then the worker that owns them.

Used by `rbee-keeper worker spawn --split B,C` and by the queen's cold start of a
model whose inventory placement says `split: [B, C]`. The order is fixed both ways:
- start: each helper's hive starts a `ggml-rpc-server` (concurrently), then the
  worker's hive checks their protocol versions and starts the worker with them;
- stop: the worker first (it holds the connections), then its RPC servers.
A failure half-way stops whatever was already started. A helper's hive also stops
its server by itself once the worker's connection is gone (see
`rbee_control.hive.rpc_servers`), so a crashed keeper or queen leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import DaemonInfo, WorkerInfo
from rbee_worker.protocol.rpc import RpcServerInfo
from rbee_worker.protocol.spawn import SpawnRequest

log = logging.getLogger("rbee.split")


class SplitNode(Protocol):
    """The part of `NodeClient` a split needs (the queen's fleet passes its own clients)."""

    async def hive_start(self) -> DaemonInfo: ...

    async def rpc_start(self, threads: int | None = None) -> RpcServerInfo: ...

    async def rpc_stop(self, rpc_id: str) -> Any: ...


class SplitWorkerNode(SplitNode, Protocol):
    async def worker_spawn(self, req: SpawnRequest) -> WorkerInfo: ...

    async def worker_stop(self, worker_id: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class SplitWorker:
    node: str
    worker: WorkerInfo
    #: helper node name → its RPC server, in the order layers are placed
    servers: tuple[tuple[str, RpcServerInfo], ...]

    @property
    def nodes(self) -> list[str]:
        return [self.node, *(name for name, _ in self.servers)]


def check_split(node: str, helpers: list[str]) -> list[str]:
    """Helper names: at least one, no repeats (the worker's own node may be one: it then holds layers too)."""
    if not helpers:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST, "split: name at least one helper node", details={"field": "split"}
        )
    if len(set(helpers)) != len(helpers):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"split: a node is named twice in {helpers}",
            details={"field": "split"},
        )
    return helpers


async def start_split(
    node: str,
    client: SplitWorkerNode,
    helpers: Mapping[str, SplitNode],
    req: SpawnRequest,
    threads: int | None = None,
) -> SplitWorker:
    check_split(node, list(helpers))
    started: list[tuple[str, RpcServerInfo]] = []

    async def one(name: str, helper: SplitNode) -> tuple[str, RpcServerInfo]:
        await helper.hive_start()
        info = await helper.rpc_start(threads)
        started.append((name, info))
        return name, info

    try:
        servers = await asyncio.gather(*(one(n, h) for n, h in helpers.items()))
        await client.hive_start()
        worker = await client.worker_spawn(replace(req, rpc_servers=tuple(s.endpoint for _, s in servers)))
    except BaseException as exc:
        await _stop_servers(helpers, started)
        if isinstance(exc, RbeeError):
            exc.message = f"split of {req.model} over {', '.join([node, *helpers])}: {exc.message}"
        raise
    log.info(
        "split worker %s on %s over %s", worker.id, node, ", ".join(f"{n}={s.endpoint}" for n, s in servers)
    )
    return SplitWorker(node, worker, tuple(servers))


async def stop_split(
    client: SplitWorkerNode,
    worker_id: str,
    helpers: Mapping[str, SplitNode],
    servers: list[tuple[str, RpcServerInfo]],
) -> Any:
    """The worker first (it holds the connections), then its RPC servers."""
    try:
        return await client.worker_stop(worker_id)
    finally:
        await _stop_servers(helpers, servers)


async def _stop_servers(helpers: Mapping[str, SplitNode], servers: list[tuple[str, RpcServerInfo]]) -> None:
    async def one(name: str, info: RpcServerInfo) -> None:
        with contextlib.suppress(RbeeError, OSError):
            await helpers[name].rpc_stop(info.id)

    await asyncio.gather(*(one(n, s) for n, s in servers))


def describe(worker: dict[str, Any], owners: Mapping[str, str], node: str) -> str:
    """`A + B, C` for a split worker: its node, then the node of each RPC server (endpoint if unknown)."""
    servers = worker.get("rpc_servers") or []
    return " + ".join([node, ", ".join(owners.get(e, e) for e in servers)]) if servers else node
