"""The fleet of an inventory: every node's hive, reached through `rbee_control.node.NodeClient`.

- `list_models` asks every node's catalog at once (`rbee-hive models list`), so N
  nodes cost about one node's round trip; a node that fails or is slow is left
  out of that listing (and logged) instead of failing the whole list.
- `spawn` starts the node's hive if needed (`hive start` is idempotent) and then a
  worker through it (`worker spawn --wait`), which returns once the worker is
  ready, with its URL and its API key.
- `close` stops, in parallel, the workers this fleet spawned and then the hives it
  started (a hive that was already running is left running); everything else on
  the nodes — workers someone else started, registered workers — is not ours.

Only the NodeClient methods in `NodeControl` are used, so any object with them
(one per node) will do; `from_inventory` builds the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from rbee_control.hive import tls
from rbee_control.inventory.placements import ModelPlacement
from rbee_control.node.split import start_split, stop_split
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import DaemonInfo, ModelInfo, WorkerInfo
from rbee_worker.protocol.rpc import RpcServerInfo
from rbee_worker.protocol.spawn import SpawnRequest

from .fleet import ModelEntry, WorkerEntry

log = logging.getLogger("rbee.queen")

LIST_TIMEOUT = 20.0


class NodeControl(Protocol):
    """The part of `rbee_control.node.NodeClient` the queen relies on."""

    async def hive_start(self) -> DaemonInfo: ...

    async def hive_stop(self) -> Any: ...

    async def hive_status(self) -> dict[str, Any]: ...

    async def models_list(self, templates: bool = False) -> list[ModelInfo]: ...

    async def models_add(self, ref: str, name: str | None = None, sha256: str | None = None) -> ModelInfo: ...

    async def worker_spawn(self, req: SpawnRequest) -> WorkerInfo: ...

    async def worker_stop(self, worker_id: str) -> Any: ...

    async def hive_tls(self) -> dict[str, Any]: ...

    async def rpc_start(self, threads: int | None = None) -> RpcServerInfo: ...

    async def rpc_stop(self, rpc_id: str) -> Any: ...


def model_entry(node: str, row: ModelInfo) -> ModelEntry:
    """A catalog row (`models list --json`) as the queen's model entry."""
    return ModelEntry(
        name=row.name,
        node=node,
        context_length=row.context_length,
        chat_template=row.chat_template,
        bos_token=row.bos_token,
        eos_token=row.eos_token,
        digest=row.sha256,
        size=row.size,
        architecture=row.architecture,
        quantization=row.quantization,
        modified_at=row.added_at,
    )


class InventoryFleet:
    def __init__(
        self,
        clients: Mapping[str, NodeControl],
        *,
        list_timeout: float = LIST_TIMEOUT,
        on_close: Callable[[], Awaitable[None]] | None = None,
        placements: Mapping[str, ModelPlacement] | None = None,
    ) -> None:
        self._clients = dict(clients)
        #: the inventory's `models:` block (node, split, replicas per model)
        self.placements = dict(placements or {})
        #: split workers' RPC servers (node, server), stopped after the worker
        self._split_servers: dict[str, list[tuple[str, RpcServerInfo]]] = {}
        self._list_timeout = list_timeout
        self._on_close = on_close
        self._spawned: list[WorkerEntry] = []
        self._hives_started: set[str] = set()
        self._hive_locks = {name: asyncio.Lock() for name in self._clients}
        self._hive_checked: set[str] = set()
        #: each node's last successful listing, served while the node is asleep or unreachable
        self._last_listing: dict[str, list[ModelEntry]] = {}
        #: what the queen verifies https workers with: the usual CAs plus each hive certificate read
        #: over SSH (a hive's certificate names the host in its workers' URLs)
        self.tls_context = ssl.create_default_context()

    @classmethod
    def from_inventory(cls, path: str | Path) -> InventoryFleet:
        """Load the inventory and open (lazily) one transport per node, shared by all commands."""
        from rbee_control.inventory.loader import load_inventory
        from rbee_control.node import NodeClient
        from rbee_control.ssh.pool import TransportPool

        inventory = load_inventory(path)
        pool = TransportPool(inventory)
        clients = {node.name: NodeClient(node, pool) for node in inventory}
        return cls(clients, on_close=pool.close, placements=inventory.models)

    def placement(self, model: str) -> ModelPlacement:
        return self.placements.get(model) or ModelPlacement.default(model)

    def node_names(self) -> list[str]:
        return list(self._clients)

    async def _fetch_if_missing(self, model: str, node: str, client: NodeControl) -> None:
        """A node without `model` downloads it from the placement's `source` (checked, resumable)."""
        placement = self.placement(model)
        if placement.source is None or any(m.name == model for m in await client.models_list()):
            return
        log.info("%s: fetching %s from %s", node, model, placement.source)
        await client.models_add(placement.source, name=model, sha256=placement.sha256)
        self._last_listing.pop(node, None)  # its next listing shows the model

    def _client(self, node: str) -> NodeControl:
        try:
            return self._clients[node]
        except KeyError:
            raise RbeeError(
                ErrorCode.UNKNOWN_NODE, f"unknown node {node!r}", details={"node": node}
            ) from None

    async def list_models(self) -> list[ModelEntry]:
        async def one(node: str, client: NodeControl) -> list[ModelEntry]:
            try:
                async with asyncio.timeout(self._list_timeout):
                    rows = await client.models_list(templates=True)
            except Exception as exc:
                known = self._last_listing.get(node, [])
                kept = f"serving its last listing ({len(known)} models)" if known else "no listing known"
                log.warning("node %s: listing models failed (%s); %s", node, exc, kept)
                return known
            listing = [model_entry(node, row) for row in rows]
            self._last_listing[node] = listing
            return listing

        listings = await asyncio.gather(*(one(n, c) for n, c in self._clients.items()))
        return [entry for listing in listings for entry in listing]

    async def node_status(self) -> dict[str, dict[str, Any] | str]:
        """Every node's `rbee-hive status` (devices, free memory, its hive's workers), asked at once;
        for a node that fails or is slow, why, instead of its status."""

        async def one(node: str, client: NodeControl) -> dict[str, Any] | str:
            try:
                async with asyncio.timeout(self._list_timeout):
                    return await client.hive_status()
            except TimeoutError:
                return f"no answer within {self._list_timeout:g} s"
            except Exception as exc:
                return str(exc) or type(exc).__name__

        names = list(self._clients)
        results = await asyncio.gather(*(one(n, self._clients[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def _ensure_hive(self, node: str, client: NodeControl) -> None:
        async with self._hive_locks[node]:
            if node in self._hive_checked:
                return
            if (await client.hive_start()).started:
                self._hives_started.add(node)
            self._hive_checked.add(node)

    async def spawn(self, model: str, node: str, *, embedding: bool = False) -> WorkerEntry:
        client = self._client(node)
        req = SpawnRequest(model, wait=True, embedding=embedding)
        split = self.placement(model).split
        if split:
            helpers = {name: self._client(name) for name in split}
            await asyncio.gather(*(self._ensure_hive(n, c) for n, c in {node: client, **helpers}.items()))
            started = await start_split(node, client, helpers, req)
            self._split_servers[started.worker.id] = list(started.servers)
            return await self._spawned_entry(node, client, started.worker, model)
        await self._ensure_hive(node, client)
        await self._fetch_if_missing(model, node, client)
        try:
            info = await client.worker_spawn(req)
        except RbeeError as exc:
            if exc.code != ErrorCode.HIVE_NOT_RUNNING:
                raise
            # The hive stopped or died since we checked: start it again, once.
            self._hive_checked.discard(node)
            await self._ensure_hive(node, client)
            info = await client.worker_spawn(req)
        return await self._spawned_entry(node, client, info, model)

    async def _spawned_entry(
        self, node: str, client: NodeControl, info: WorkerInfo, model: str
    ) -> WorkerEntry:
        if not info.api_key:
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"node {node} gave worker {info.id} without its key")
        if info.url.startswith("https:"):
            await self._pin_certificate(node, client)
        entry = WorkerEntry(id=info.id, node=node, url=info.url, api_key=info.api_key, model=model)
        self._spawned.append(entry)
        return entry

    async def _pin_certificate(self, node: str, client: NodeControl) -> None:
        info = await client.hive_tls()
        pem = str(info.get("certificate", ""))
        if not pem or tls.fingerprint(pem) != info.get("fingerprint"):
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"node {node}: certificate and fingerprint differ")
        tls.pin(self.tls_context, pem)

    async def stop_worker(self, entry: WorkerEntry) -> None:
        await self._stop(entry)
        if entry in self._spawned:
            self._spawned.remove(entry)

    async def _stop(self, entry: WorkerEntry) -> Any:
        """A split worker first, then its RPC servers; any other worker just stops."""
        servers = self._split_servers.pop(entry.id, [])
        return await stop_split(self._client(entry.node), entry.id, self._clients, servers)

    async def close(self) -> None:
        spawned, self._spawned = list(self._spawned), []
        results = await asyncio.gather(*(self._stop(e) for e in spawned), return_exceptions=True)
        for entry, result in zip(spawned, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("stopping worker %s on %s failed: %s", entry.id, entry.node, result)
        hives = sorted(self._hives_started)
        self._hives_started.clear()
        results = await asyncio.gather(*(self._clients[n].hive_stop() for n in hives), return_exceptions=True)
        for node, result in zip(hives, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("stopping the hive on %s failed: %s", node, result)
        if self._on_close is not None:
            await self._on_close()
