"""One transport per node for a whole CLI run, opened on first use, and concurrent fan-out.

`status` or `stop --all` over N nodes should cost about one node's time, and a
node that is down should cost its connect timeout once (in parallel with the
others) and then be reported, not fail the run. A failed connect is remembered
for `failure_ttl` seconds so later commands in the same run fail fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from rbee_control.inventory.model import Inventory, Node
from rbee_control.ssh.held_client import ConnectionHolder
from rbee_control.ssh.known_hosts import KnownHosts
from rbee_control.ssh.local import LocalTransport
from rbee_control.ssh.remote import SshTransport
from rbee_control.ssh.transport import NodeTransport
from rbee_worker.protocol.errors import ErrorCode, RbeeError

T = TypeVar("T")
FAILURE_TTL = 30.0


def make_transport(
    node: Node,
    *,
    known_hosts: KnownHosts | None = None,
    connect_timeout: float | None = None,
    holder: ConnectionHolder | None = None,
) -> NodeTransport:
    """The transport the node's inventory entry asks for (not yet connected)."""
    if node.is_local:
        return LocalTransport(node)
    return SshTransport(node, known_hosts=known_hosts, connect_timeout=connect_timeout, holder=holder)


async def open_transport(
    node: Node,
    *,
    known_hosts: KnownHosts | None = None,
    connect_timeout: float | None = None,
    holder: ConnectionHolder | None = None,
) -> NodeTransport:
    """A connected transport for one node (the caller closes it)."""
    transport = make_transport(node, known_hosts=known_hosts, connect_timeout=connect_timeout, holder=holder)
    await transport.connect()
    return transport


@dataclass(frozen=True, slots=True)
class NodeOutcome(Generic[T]):
    """What one node answered in a fan-out: a value or an error, never both."""

    node: str
    value: T | None = None
    error: RbeeError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class TransportPool:
    """Lazily opened, shared transports for the nodes of one inventory."""

    def __init__(
        self,
        inventory: Inventory,
        *,
        known_hosts: KnownHosts | None = None,
        connect_timeout: float | None = None,
        failure_ttl: float = FAILURE_TTL,
        holder: ConnectionHolder | None = None,
    ) -> None:
        """`holder`: the keeper's connection holder, for socket exchanges (see `SshTransport`)."""
        self.inventory = inventory
        self._holder = holder
        self.known_hosts = known_hosts or KnownHosts()
        self._connect_timeout = connect_timeout
        self._failure_ttl = failure_ttl
        self._opening: dict[str, asyncio.Task[NodeTransport]] = {}
        self._failed_at: dict[str, float] = {}

    async def __aenter__(self) -> TransportPool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def get(self, node: str | Node) -> NodeTransport:
        """The node's transport, connecting on first use; concurrent callers share one connect."""
        target = self.inventory.node(node) if isinstance(node, str) else node
        task = self._opening.get(target.name)
        if task is not None and task.done() and (task.cancelled() or self._expired(target.name)):
            task = None
        if task is None:
            task = asyncio.create_task(
                open_transport(
                    target,
                    known_hosts=self.known_hosts,
                    connect_timeout=self._connect_timeout,
                    holder=self._holder,
                )
            )
            task.add_done_callback(functools.partial(self._note_failure, target.name))
            self._opening[target.name] = task
        return await asyncio.shield(task)

    def _expired(self, name: str) -> bool:
        """A finished connect that failed long enough ago to be tried again."""
        task = self._opening[name]
        if task.exception() is None:
            return False
        return time.monotonic() - self._failed_at.get(name, 0.0) >= self._failure_ttl

    def _note_failure(self, name: str, task: asyncio.Task[NodeTransport]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failed_at[name] = time.monotonic()

    async def fan_out(
        self,
        nodes: Iterable[str | Node],
        fn: Callable[[NodeTransport], Awaitable[T]],
        *,
        timeout: float | None = None,
    ) -> dict[str, NodeOutcome[T]]:
        """Run `fn(transport)` on every node at once; one outcome per node, in the order given."""
        targets = [self.inventory.node(n) if isinstance(n, str) else n for n in nodes]

        async def one(node: Node) -> NodeOutcome[T]:
            try:
                async with asyncio.timeout(timeout):
                    transport = await self.get(node)
                    return NodeOutcome(node.name, value=await fn(transport))
            except RbeeError as err:
                return NodeOutcome(node.name, error=err)
            except TimeoutError:
                return NodeOutcome(
                    node.name,
                    error=RbeeError(
                        ErrorCode.REQUEST_TIMEOUT,
                        f"node {node.name} did not answer within {timeout:g}s",
                        details={"node": node.name},
                    ),
                )
            except Exception as exc:
                return NodeOutcome(
                    node.name,
                    error=RbeeError(
                        ErrorCode.INTERNAL_ERROR,
                        f"node {node.name}: {type(exc).__name__}: {exc}",
                        details={"node": node.name},
                    ),
                )

        outcomes = await asyncio.gather(*(one(node) for node in targets))
        return {outcome.node: outcome for outcome in outcomes}

    async def close(self) -> None:
        """Close every opened transport (and stop connects still in progress)."""
        tasks, self._opening = list(self._opening.values()), {}
        if not tasks:
            return
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                with contextlib.suppress(Exception):
                    await task.result().close()
