"""A handle on one node: `rbee-hive --json …` over its transport, or its daemon's socket.

Every method runs one node command, turns its `progress` events into callbacks
and returns its one `result` (or raises its `error`), so the keeper and the queen
drive a node the same way whether it is this machine or one across SSH. Reads that
a fleet fans out (status, the catalog, the worker list) ask a running daemon on its
socket instead (`hive_socket`): one round trip, no process started on the node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rbee_control import __version__ as HIVE_VERSION
from rbee_control.inventory.model import Node
from rbee_control.node.hive_socket import hive_get
from rbee_control.ssh.node_command import hive_command, node_env
from rbee_control.ssh.transport import NodeTransport
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import (
    KEEPER_VERSION_ENV,
    DaemonInfo,
    ModelInfo,
    StopResult,
    WorkerInfo,
    check_worker_id,
)
from rbee_worker.protocol.node_events import NODE_PLACEHOLDER, NodeEvent, parse_line
from rbee_worker.protocol.rpc import RpcServerInfo, check_rpc_id
from rbee_worker.protocol.spawn import SpawnRequest

if TYPE_CHECKING:  # asyncssh is imported only by commands that use SSH (warm `infer` does not)
    from rbee_control.ssh.pool import TransportPool

ProgressCallback = Callable[[NodeEvent], None]

#: Seconds a waited-for spawn may take when the request names no timeout.
SPAWN_TIMEOUT = 300.0

#: Seconds a node's daemon may take to answer status or its catalog before the node shows as silent.
STATUS_TIMEOUT = 10.0

#: Exit status of a shell that could not find or run the program.
_NOT_INSTALLED = {126, 127}


def check_version(node: str, version: str) -> None:
    """A node on another release than the keeper is refused with the command that upgrades it."""
    if version != HIVE_VERSION:
        raise RbeeError(
            ErrorCode.VERSION_MISMATCH,
            f"node {node} runs rbee {version}, this keeper is rbee {HIVE_VERSION}",
            details={"node": node, "node_version": version, "keeper_version": HIVE_VERSION},
            hint=f"rbee-keeper setup upgrade --node {node}",
        )


def no_answer(node: Node, timeout: float) -> RbeeError:
    return RbeeError(
        ErrorCode.REQUEST_TIMEOUT,
        f"the hive on node {node.name} did not answer within {timeout:g}s",
        details={"node": node.name, "timeout": timeout},
        hint=f"rbee-keeper status --node {node.name} --timeout 60 (busy?), or its home's logs/hive.log",
    )


class NodeClient:
    """Bound to one transport (a CLI run) or to a pool that reconnects on demand (the queen)."""

    def __init__(self, node: Node, via: NodeTransport | TransportPool, *, same_version: bool = True) -> None:
        """`same_version`: the hive must be this release (it refuses otherwise); off only for what
        `setup upgrade` and `uninstall` ask a hive of another release."""
        self.node = node
        self._via = via
        self._version_env = {KEEPER_VERSION_ENV: HIVE_VERSION} if same_version else {}
        self._socket_checked = not same_version

    async def transport(self) -> NodeTransport:
        if isinstance(self._via, NodeTransport):
            return self._via
        return await self._via.get(self.node)

    async def call(
        self,
        *args: str,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run `rbee-hive --json *args` on the node (`env` added to its environment); the result
        payload, or its error raised."""
        argv = hive_command(self.node, "--json", *args)
        result: NodeEvent | None = None
        stray: list[str] = []
        async with asyncio.timeout(timeout):
            transport = await self.transport()
            async with transport.stream(
                argv, env=node_env(self.node, {**self._version_env, **(env or {})})
            ) as proc:
                async for line in proc:
                    try:
                        event = parse_line(line)
                    except ValueError:
                        stray.append(line)
                        continue
                    if event.is_final:
                        result = event
                    elif progress is not None:
                        progress(event)
                status = await proc.wait()
        if result is not None and result.event == "error":
            err = result.to_error()
            # a hive does not know its inventory name; its hints say <node> where the command needs it
            err.message = err.message.replace(NODE_PLACEHOLDER, self.node.name)
            err.hint = err.hint.replace(NODE_PLACEHOLDER, self.node.name) if err.hint else err.hint
            raise err
        if result is not None:
            return result.data
        if status.exit_status in _NOT_INSTALLED:
            raise RbeeError(
                ErrorCode.HIVE_NOT_RUNNING,
                f"rbee is not installed on node {self.node.name} ({argv[0]} not found)",
                hint=f"rbee-keeper setup install --node {self.node.name}",
            )
        await self._check_version()  # an older hive fails on what it does not know: say why
        detail = (status.stderr or "\n".join(stray)).strip().splitlines()[-3:]
        raise RbeeError(
            ErrorCode.INTERNAL_ERROR,
            f"rbee-hive {args[0] if args else ''} on {self.node.name} exited {status.exit_status} "
            f"without a result: {' | '.join(detail) or 'no output'}",
        )

    # --- the daemon -------------------------------------------------------------

    async def hive_start(self) -> DaemonInfo:
        """Start the node's daemon if it is not running (idempotent); check its version."""
        info = DaemonInfo.from_json(
            await self.call("daemon", "--detach", "--address", self.node.address, timeout=60)
        )
        if info.version:
            check_version(self.node.name, info.version)
        return info

    async def hive_status(self, timeout: float = STATUS_TIMEOUT) -> dict[str, Any]:
        """The daemon's own answer over its socket (one round trip); the `status` command if it is down.

        Either way the answer has the same shape; `via` says which path gave it.
        """
        try:
            status = {**await self.ask_hive("/v1/status", timeout), "via": "socket"}
        except RbeeError as exc:
            if exc.code != ErrorCode.HIVE_NOT_RUNNING:
                raise
            status = {**await self.call("status", timeout=30), "via": "command"}
        if isinstance(status.get("version"), str):
            check_version(self.node.name, status["version"])
        return status

    async def ask_hive(self, path: str, timeout: float = STATUS_TIMEOUT) -> Any:
        """`GET path` on the hive daemon's socket (HIVE_NOT_RUNNING when nothing answers there).

        `timeout` bounds the exchange, not the connection (which has its own connect timeout).
        """
        transport = await self.transport()
        try:
            async with asyncio.timeout(timeout):
                if not self._socket_checked and path not in ("/v1/health", "/v1/status"):
                    # the socket skips the hive's own release check: ask once per client
                    version = (await hive_get(transport, "/v1/health")).get("version")
                    if isinstance(version, str):
                        check_version(self.node.name, version)
                    self._socket_checked = True
                return await hive_get(transport, path)
        except TimeoutError:
            raise no_answer(self.node, timeout) from None

    async def _check_version(self) -> None:
        """Raise VERSION_MISMATCH if the node's installed rbee-hive is not this keeper's release."""
        transport = await self.transport()
        found = await transport.run(hive_command(self.node, "--version"), env=node_env(self.node), timeout=30)
        words = found.stdout.split()
        if found.ok and len(words) == 2 and words[0] == "rbee-hive":
            check_version(self.node.name, words[1])

    async def hive_stop(self) -> dict[str, Any]:
        return await self.call("stop", timeout=90)

    async def hive_tls(self) -> dict[str, Any]:
        """The hive's worker certificate (`certificate` PEM, `fingerprint`), read over this channel."""
        return await self.call("tls", timeout=30)

    # --- models -----------------------------------------------------------------

    async def models_list(self, templates: bool = False) -> list[ModelInfo]:
        """The node's catalog: from the running daemon in one round trip, else by `models list`."""
        try:
            listing = await self.ask_hive("/v1/models?templates=1" if templates else "/v1/models")
        except RbeeError as exc:
            if exc.code != ErrorCode.HIVE_NOT_RUNNING:
                raise
            args = ["models", "list", *(["--templates"] if templates else [])]
            listing = await self.call(*args, timeout=30)
        return [ModelInfo.from_json(row) for row in listing.get("models", [])]

    async def models_add(
        self,
        ref: str,
        name: str | None = None,
        sha256: str | None = None,
        progress: ProgressCallback | None = None,
        max_bytes: int | None = None,
    ) -> ModelInfo:
        args = ["models", "add", ref]
        if name:
            args += ["--name", name]
        if sha256:
            args += ["--sha256", sha256]
        if max_bytes:
            args += ["--max-bytes", str(max_bytes)]
        return ModelInfo.from_json(await self.call(*args, progress=progress))

    async def models_rm(self, name: str) -> dict[str, Any]:
        return await self.call("models", "rm", name, timeout=30)

    # --- workers ----------------------------------------------------------------

    async def worker_spawn(self, req: SpawnRequest, progress: ProgressCallback | None = None) -> WorkerInfo:
        """Start a worker; with `req.wait` (the usual), once it is loaded. Timeout: `req.timeout` or 300 s."""
        timeout = req.timeout or SPAWN_TIMEOUT
        if req.wait:
            req = replace(req, timeout=timeout)
        info = await self.call("worker", "spawn", *req.to_argv(), progress=progress, timeout=timeout + 30)
        return WorkerInfo.from_json(info)

    async def worker_list(self) -> list[WorkerInfo]:
        """The hive's workers; a hive that is not running has none."""
        try:
            try:
                listing = await self.ask_hive("/v1/workers/list")
            except RbeeError as exc:
                if exc.code != ErrorCode.HIVE_NOT_RUNNING:
                    raise
                listing = await self.call("worker", "list", timeout=30)
            return [WorkerInfo.from_json(w) for w in listing.get("workers", [])]
        except RbeeError as exc:
            if exc.code == ErrorCode.HIVE_NOT_RUNNING and "not installed" not in exc.message:
                return []
            raise

    async def worker_stop(self, worker_id: str) -> StopResult:
        return StopResult.from_json(await self.call("worker", "stop", check_worker_id(worker_id), timeout=60))

    # --- RPC servers (the helper side of a split worker) -------------------------

    async def rpc_start(self, threads: int | None = None) -> RpcServerInfo:
        """A `ggml-rpc-server` on this node's inventory address, for a split worker on another node."""
        argv = ["--threads", str(threads)] if threads else []
        return RpcServerInfo.from_json(await self.call("rpc", "start", *argv, timeout=90))

    async def rpc_list(self) -> list[RpcServerInfo]:
        try:
            listing = await self.call("rpc", "list", timeout=30)
        except RbeeError as exc:
            if exc.code == ErrorCode.HIVE_NOT_RUNNING and "not installed" not in exc.message:
                return []
            raise
        return [RpcServerInfo.from_json(s) for s in listing.get("servers", [])]

    async def rpc_stop(self, rpc_id: str) -> StopResult:
        return StopResult.from_json(await self.call("rpc", "stop", check_rpc_id(rpc_id), timeout=60))
