"""The `ggml-rpc-server` processes this hive runs for split workers on other nodes.

A split worker (on node A) places layers on RPC servers of nodes B and C; each of
those hives starts one here, bound to the node's inventory address (never a
wildcard: the RPC protocol has no authentication) on a port of the worker range.

Ownership is the TCP connection: a loaded split worker holds one connection to
each of its servers, and the kernel closes it however the worker ends (stopped,
crashed, its hive or node gone). So a server whose client has been gone for
`rpc_grace` seconds, or that no client reached within the loading timeout, is
stopped here; nothing cross-node has to remember to clean up.

Before a server is offered, the hive speaks the RPC HELLO to it and refuses a
protocol version this node's llama-cpp-python would not accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.rpc import (
    RpcServerInfo,
    RpcVersion,
    check_rpc_id,
    check_versions,
    device_memory,
    format_endpoint,
    hello,
    parse_endpoint,
)
from rbee_worker.runtimes.rpc_devices import client_version, has_rpc

__all__ = [
    "BINARY",
    "RpcRecord",
    "RpcServers",
    "check_rpc_servers",
    "find_binary",
    "has_rpc",
    "lost_rpc_servers",
    "probe",
]

from .config import HiveConfig
from .paths import HivePaths
from .pidfiles import write_private
from .process import create_time, is_alive, terminate

log = logging.getLogger("rbee.hive")

BINARY = "ggml-rpc-server"
BINARY_ENV = "RBEE_RPC_SERVER"
_PORT_RETRIES = 3


def find_binary() -> str:
    """`$RBEE_RPC_SERVER`, else the one installed beside this Python (setup installs it there), else PATH."""
    override = os.environ.get(BINARY_ENV)
    if override:
        return override
    beside = Path(sys.prefix) / "bin" / BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(BINARY)
    if found:
        return found
    raise RbeeError(
        ErrorCode.BACKEND_NOT_AVAILABLE,
        f"{BINARY} is not installed on this node",
        status=422,
        hint="rbee-keeper setup install --extras llama (builds it from llama-cpp-python's llama.cpp)",
    )


def rpc_dir(paths: HivePaths) -> Path:
    return paths.home / "rpc"


@dataclass(slots=True)
class RpcRecord:
    id: str
    pid: int
    create_time: float | None
    host: str
    port: int
    version: str
    threads: int | None
    started_at: float
    clients: int = 0
    #: when a client was last seen connected (0: never)
    client_seen_at: float = 0.0

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.host, self.port)

    def info(self) -> RpcServerInfo:
        return RpcServerInfo(
            self.id, self.endpoint, self.pid, self.version, self.threads, self.clients, self.started_at
        )

    def save(self, paths: HivePaths) -> None:
        write_private(rpc_dir(paths) / f"{self.id}.json", json.dumps(asdict(self)))

    def remove(self, paths: HivePaths) -> None:
        (rpc_dir(paths) / f"{self.id}.json").unlink(missing_ok=True)


def _sockets_on_port(record: RpcRecord, status: str) -> int:
    """The server process's own TCP sockets on its port in `status` (0 when it is gone)."""
    try:
        conns = psutil.Process(record.pid).net_connections(kind="tcp")
    except psutil.Error:
        return 0
    return sum(1 for c in conns if c.status == status and c.laddr and c.laddr.port == record.port)


def connected_clients(record: RpcRecord) -> int:
    """Established TCP connections the server holds on its port (0 when it is gone)."""
    return _sockets_on_port(record, psutil.CONN_ESTABLISHED)


def listens(record: RpcRecord) -> bool:
    """Does the server's own process hold the listening socket of its port?"""
    return _sockets_on_port(record, psutil.CONN_LISTEN) > 0


def _tail(path: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class RpcServers:
    def __init__(self, paths: HivePaths, config: HiveConfig) -> None:
        self.paths = paths
        self.config = config
        self._servers: dict[str, RpcRecord] = {}

    def list(self) -> list[RpcRecord]:
        return list(self._servers.values())

    def ports(self) -> set[int]:
        return {r.port for r in self._servers.values()}

    def log_path(self, rpc_id: str) -> Path:
        return self.paths.logs_dir / f"{check_rpc_id(rpc_id)}.log"

    async def start(self, threads: int | None, pick_port: Callable[[set[int]], int]) -> RpcRecord:
        """Launch one server on a free port and prove it answers a HELLO we accept.

        `pick_port(skip)` returns a free port of the hive's range (shared with workers).
        """
        if self.config.address in ("0.0.0.0", "::"):
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                "refusing to bind an RPC server to a wildcard address: it has no authentication",
                hint="give the node its LAN address in the inventory (address:)",
            )
        binary = find_binary()
        client = client_version()
        skip: set[int] = set()
        for _ in range(_PORT_RETRIES):
            port = pick_port(skip)
            record = await self._launch(binary, port, threads)
            try:
                version = await self._await_hello(record)
            except RbeeError as exc:
                await self._kill(record, "did not start")
                if "Failed to create server socket" in _tail(self.log_path(record.id)):
                    skip.add(port)
                    continue
                raise exc
            try:
                if client is not None:
                    check_versions(record.endpoint, version, client)
            except RbeeError:
                await self._kill(record, "protocol version mismatch")
                raise
            record.version = str(version)
            self._servers[record.id] = record
            record.save(self.paths)
            log.info(
                "%s: %s on %s (pid %d), protocol %s", record.id, BINARY, record.endpoint, record.pid, version
            )
            return record
        raise RbeeError(ErrorCode.NO_PORT_AVAILABLE, "lost the race for a port three times")

    async def _launch(self, binary: str, port: int, threads: int | None) -> RpcRecord:
        rpc_id = f"rpc-{secrets.token_hex(4)}"
        cmd = [binary, "-H", self.config.address, "-p", str(port)]
        if threads:
            cmd += ["-t", str(threads)]
        rpc_dir(self.paths).mkdir(exist_ok=True, mode=0o700)
        with self.log_path(rpc_id).open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} hive starts {rpc_id}\n".encode())
            out.flush()
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.paths.home,
                start_new_session=True,
            )
        return RpcRecord(
            rpc_id, proc.pid, create_time(proc.pid), self.config.address, port, "", threads, time.time()
        )

    async def _await_hello(self, record: RpcRecord) -> RpcVersion:
        deadline = time.monotonic() + self.config.startup_timeout
        while True:
            if not is_alive(record.pid, record.create_time):
                raise RbeeError(
                    ErrorCode.WORKER_CRASHED,
                    f"{BINARY} exited at start: {_tail(self.log_path(record.id), 3)}",
                    details={"log": str(self.log_path(record.id))},
                )
            # its own listening socket first: a probe alone would greet a server that won the port
            if listens(record) and await asyncio.to_thread(probe, record.host, record.port, 1.0):
                return await asyncio.to_thread(hello, record.endpoint)
            if time.monotonic() > deadline:
                raise RbeeError(ErrorCode.LOADING_TIMEOUT, f"{BINARY} did not listen on {record.endpoint}")
            await asyncio.sleep(0.05)

    def require(self, rpc_id: str) -> RpcRecord:
        record = self._servers.get(check_rpc_id(rpc_id))
        if record is None:
            raise RbeeError(
                ErrorCode.NOT_FOUND, f"no rpc server {rpc_id} on this node", details={"id": rpc_id}
            )
        return record

    async def stop(self, rpc_id: str, reason: str) -> str:
        record = self._servers.pop(check_rpc_id(rpc_id), None)
        if record is None:
            return "exited"
        return await self._kill(record, reason)

    async def _kill(self, record: RpcRecord, reason: str) -> str:
        how = await terminate(record.pid, record.create_time, term_grace=self.config.stop_timeout)
        record.remove(self.paths)
        log.info("%s on %s stopped (%s): %s", record.id, record.endpoint, how, reason)
        return how

    async def stop_all(self, reason: str) -> None:
        await asyncio.gather(*(self.stop(r, reason) for r in list(self._servers)), return_exceptions=True)

    async def reap(self) -> None:
        """Stop servers whose process died, whose worker left, or that no worker ever reached."""
        now = time.time()
        for record in list(self._servers.values()):
            if not is_alive(record.pid, record.create_time):
                self._servers.pop(record.id, None)
                record.remove(self.paths)
                log.warning(
                    "%s on %s exited: %s", record.id, record.endpoint, _tail(self.log_path(record.id), 2)
                )
                continue
            before, record.clients = record.clients, await asyncio.to_thread(connected_clients, record)
            if record.clients and before:  # seen twice running: a worker, not a version check passing by
                record.client_seen_at = now
            elif record.client_seen_at and now - record.client_seen_at > self.config.rpc_grace:
                await self.stop(record.id, "its split worker disconnected")
            elif not record.client_seen_at and now - record.started_at > self.config.loading_timeout:
                await self.stop(record.id, f"no worker connected within {self.config.loading_timeout:g} s")

    async def clean_leftovers(self) -> None:
        """Servers an earlier hive started and could not stop (it was killed): no worker owns them now."""
        directory = rpc_dir(self.paths)
        for path in sorted(directory.glob("rpc-*.json")) if directory.is_dir() else []:
            try:
                data = json.loads(path.read_text())
                record = RpcRecord(**data)
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            await self._kill(record, "left by an earlier hive")


def check_rpc_servers(endpoints: tuple[str, ...]) -> int:
    """Before a split worker starts: every server answers, in a version this node's llama.cpp speaks;
    the bytes free on all their devices together, what its layers are planned against.

    llama.cpp would abort the worker on either, so it is refused here with a message instead.
    """
    if not has_rpc():
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            "this node's llama-cpp-python was built without the RPC backend",
            status=422,
            hint="rbee-keeper setup install --extras llama (builds it with -DGGML_RPC=ON)",
        )
    client = client_version()
    return sum(device_memory(endpoint, client)[0] for endpoint in endpoints)


def probe(host: str, port: int, timeout: float = 2.0) -> bool:
    """Does anything accept connections there? Only for a server nobody uses yet: ggml-rpc-server
    listens with a backlog of 1 and accepts nothing while it serves its worker, so probes of a busy
    server fill its queue and the next connection hangs."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def lost_rpc_servers(worker_pid: int, endpoints: list[str]) -> list[str]:
    """The endpoints a loaded split worker no longer holds an open connection to.

    Read from the worker's own sockets (no traffic to the servers): a server that
    exited or was stopped closed its side, leaving the worker's socket in CLOSE_WAIT
    or gone. A worker whose sockets cannot be read (it just exited) counts as losing none.
    """
    try:
        conns = psutil.Process(worker_pid).net_connections(kind="tcp")
    except psutil.Error:
        return []
    held: set[tuple[str, int]] = {
        (c.raddr.ip, c.raddr.port) for c in conns if c.raddr and c.status == psutil.CONN_ESTABLISHED
    }
    lost = []
    for endpoint in endpoints:
        host, port = parse_endpoint(endpoint)
        try:
            ips = {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except OSError:
            ips = {host}
        if not any((ip, port) in held for ip in ips):
            lost.append(endpoint)
    return lost
