"""Which model names the queen offers, and what a requested name means.

The offer is every model in the fleet's catalogs (cached for `ttl` seconds, since
asking the nodes costs an SSH round trip each) plus every model a worker in the
routing table serves. A name stands for the model wherever it is; when the same
name is on several nodes with *different* files (different sha256), it is offered
as `node/name` on each instead, because routing between them would make answers
depend on luck. `node/name` is also accepted for any model, to pin a node.

An unknown name triggers one early refresh (at most one every
`min_refresh_interval` seconds, shared by concurrent requests) before the client
gets MODEL_NOT_FOUND with the list of what is available.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .fleet import Fleet, ModelEntry
from .workers import WorkerTable

log = logging.getLogger("rbee.queen")


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved request: the catalog name, the pinned node (if any), where it could be started."""

    public_id: str
    model: str
    node: str | None
    nodes: tuple[str, ...]
    entry: ModelEntry
    #: routed to workers that serve embeddings (and cold-started with `embedding`), not generation
    embedding: bool = False


@dataclass(frozen=True, slots=True)
class PublicModel:
    id: str
    owned_by: str
    entries: tuple[ModelEntry, ...]


def _groups(entries: Iterable[ModelEntry]) -> dict[str, list[ModelEntry]]:
    groups: dict[str, list[ModelEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.name, []).append(entry)
    return groups


def _conflicting(group: list[ModelEntry]) -> bool:
    return len({e.digest for e in group if e.digest}) > 1


def _best(group: list[ModelEntry]) -> ModelEntry:
    """Prefer an entry that knows the chat template."""
    return next((e for e in group if e.chat_template), group[0])


def public_models(entries: Iterable[ModelEntry]) -> list[PublicModel]:
    out: list[PublicModel] = []
    for name, group in _groups(entries).items():
        if _conflicting(group):
            for entry in group:
                out.append(PublicModel(f"{entry.node}/{name}", entry.node, (entry,)))
        else:
            nodes = list(dict.fromkeys(e.node for e in group))
            out.append(PublicModel(name, ",".join(nodes), tuple(group)))
    return out


class ModelCatalog:
    def __init__(
        self, fleet: Fleet, table: WorkerTable, *, ttl: float = 30.0, min_refresh_interval: float = 2.0
    ) -> None:
        self._fleet = fleet
        self._table = table
        self._ttl = ttl
        self._min_refresh = min_refresh_interval
        self._cached: list[ModelEntry] = []
        self._fetched_at = float("-inf")
        self._refreshing: asyncio.Task[list[ModelEntry]] | None = None

    async def _fleet_models(self, force: bool) -> list[ModelEntry]:
        """The cached listing; past its `ttl` it is still served while a refresh runs behind it (a
        node asleep or unreachable costs the client nothing). Only the first listing, and a forced
        refresh for a name nobody knows, wait for the nodes."""
        age = time.monotonic() - self._fetched_at
        if age < (self._min_refresh if force else self._ttl):
            return self._cached
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._fetch())
        if not force and self._fetched_at > float("-inf"):
            return self._cached
        return await asyncio.shield(self._refreshing)

    async def _fetch(self) -> list[ModelEntry]:
        try:
            self._cached = list(await self._fleet.list_models())
        except Exception as exc:  # keep serving what we knew; the next refresh tries again
            log.warning("listing the fleet's models failed: %s", exc)
        self._fetched_at = time.monotonic()
        return self._cached

    async def entries(self, *, force: bool = False) -> list[ModelEntry]:
        """Fleet catalog entries, then models served by workers the catalog does not list."""
        out = {(e.name, e.node): e for e in await self._fleet_models(force)}
        for worker in self._table:
            key = (worker.model, worker.node)
            known = out.get(key)
            meta = worker.meta or ModelEntry(worker.model, worker.node)
            if known is None or (not known.chat_template and meta.chat_template):
                out[key] = meta
        return list(out.values())

    async def public_models(self) -> list[PublicModel]:
        return public_models(await self.entries())

    async def close(self) -> None:
        """Stop a background refresh (the queen is exiting)."""
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def resolve(self, requested: str) -> Target:
        entries = await self.entries()
        target = _match(requested, entries)
        if target is None:
            entries = await self.entries(force=True)
            target = _match(requested, entries)
        if target is None:
            raise _not_found(requested, entries)
        return target


def _match(requested: str, entries: list[ModelEntry]) -> Target | None:
    groups = _groups(entries)
    group = groups.get(requested)
    if group and not _conflicting(group):
        nodes = tuple(dict.fromkeys(e.node for e in group))
        return Target(requested, requested, None, nodes, _best(group))
    node, sep, name = requested.partition("/")
    if sep:
        pinned = [e for e in groups.get(name, []) if e.node == node]
        if pinned:
            return Target(requested, name, node, (node,), _best(pinned))
    return None


def _not_found(requested: str, entries: list[ModelEntry]) -> RbeeError:
    available = [m.id for m in public_models(entries)]
    group = _groups(entries).get(requested)
    if group:
        choices = [f"{e.node}/{requested}" for e in group]
        message = (
            f"model {requested!r} is a different file on each of several nodes; "
            f"ask for one of: {', '.join(choices)}"
        )
    else:
        listing = ", ".join(available) if available else "none"
        message = f"model {requested!r} not found (available: {listing})"
    return RbeeError(
        ErrorCode.MODEL_NOT_FOUND,
        message,
        details={"model": requested, "available": available, "field": "model"},
    )
