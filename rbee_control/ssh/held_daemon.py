"""The connection holder: keeps the keeper's SSH connections open between its runs.

Each `rbee-keeper status` used to open one SSH connection per node and close it
on exit; over 32 nodes the handshakes (the node's sshd forks and re-executes
itself for every one) were most of the wait. This process is what OpenSSH's
ControlPersist is to Ansible: the keeper starts it on first need, sends it one
exchange with a hive's Unix socket at a time (`held_wire`), and it answers over
the connection it already holds, opening one only for a node it has not seen.

One holder per user, release and directory (a lock file); its socket is 0600 in
a 0700 directory and a peer of another uid is refused. It verifies host keys
against the keeper's known_hosts exactly as the keeper does, per request, so a
re-pinned key means a new connection. After `persist` seconds without a request
it closes every connection and exits.

    python -m rbee_control.ssh.held_daemon DIR PERSIST_SECONDS
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from rbee_control.ssh.held_paths import control_socket, lock_file
from rbee_control.ssh.held_wire import REQUEST_LINE_LIMIT, ExchangeReply, ExchangeRequest
from rbee_control.ssh.known_hosts import KnownHosts
from rbee_control.ssh.remote import SshTransport
from rbee_worker.protocol.errors import ErrorCode, RbeeError

#: seconds between looks for idle connections
SWEEP_EVERY = 1.0
#: the longest one exchange may take here (the keeper's own timeout is usually far shorter)
EXCHANGE_CAP = 600.0

ConnectionKey = tuple[object, ...]


class Holder:
    """The held connections, keyed by everything that decides who is at the other end."""

    def __init__(self, persist: float) -> None:
        self.persist = persist
        self.last_request = time.monotonic()
        self.in_flight = 0
        self._held: dict[ConnectionKey, tuple[SshTransport, float]] = {}

    def _transport(self, req: ExchangeRequest) -> SshTransport:
        known = KnownHosts(req.known_hosts)
        pinned = tuple(sorted(k.public_data for k in known.lookup(req.host, req.port)))
        key: ConnectionKey = (req.node, req.host, req.port, req.user, req.key, req.known_hosts, pinned)
        held = self._held.get(key)
        transport = held[0] if held else None
        if transport is None:
            settings = req.node_settings()
            transport = SshTransport(settings, known_hosts=known, connect_timeout=req.connect_timeout)
            _log(f"holding {req.node} ({req.user or ''}@{req.host}:{req.port})")
        self._held[key] = (transport, time.monotonic())
        return transport

    async def exchange(self, req: ExchangeRequest) -> ExchangeReply:
        transport = self._transport(req)
        try:
            async with asyncio.timeout(EXCHANGE_CAP):
                answer = await transport.unix_exchange(req.path, req.request, limit=req.limit)
            return ExchangeReply(reply=answer)
        except RbeeError as exc:
            return ExchangeReply(error=exc)
        except TimeoutError:
            return ExchangeReply(error=RbeeError(ErrorCode.REQUEST_TIMEOUT, f"node {req.node}: no answer"))
        except Exception as exc:
            message = f"node {req.node}: {type(exc).__name__}: {exc}"
            return ExchangeReply(error=RbeeError(ErrorCode.INTERNAL_ERROR, message))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        self.last_request = time.monotonic()
        try:
            if not _same_user(writer.get_extra_info("socket")):
                return
            try:
                req = ExchangeRequest.from_line(await reader.readline())
            except (ValueError, asyncio.LimitOverrunError) as exc:
                reply = ExchangeReply(error=RbeeError(ErrorCode.INVALID_REQUEST, str(exc)))
            else:
                reply = await self.exchange(req)
            writer.write(reply.to_line())
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            self.in_flight -= 1
            self.last_request = time.monotonic()
            writer.close()

    async def sweep(self) -> bool:
        """Close connections unused for `persist` seconds; True when the holder itself is done."""
        now = time.monotonic()
        for key, (transport, used) in list(self._held.items()):
            if now - used >= self.persist and self.in_flight == 0:
                del self._held[key]
                with contextlib.suppress(Exception):
                    await transport.close()
        return self.in_flight == 0 and now - self.last_request >= self.persist

    async def close(self) -> None:
        held, self._held = list(self._held.values()), {}
        for transport, _ in held:
            with contextlib.suppress(Exception):
                await transport.close()


def _same_user(sock: socket.socket | None) -> bool:
    """The peer's uid is ours (Linux SO_PEERCRED; elsewhere the 0700 directory is the guard)."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}", file=sys.stderr, flush=True)


async def serve(directory: Path, persist: float) -> int:
    lock = os.open(lock_file(directory), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another holder of this release serves this directory
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    path = control_socket(directory)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a holder that died left it; the lock says none is alive
    holder = Holder(persist)
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(holder.handle, str(path), limit=REQUEST_LINE_LIMIT)
    finally:
        os.umask(old_umask)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log(f"holding SSH connections for the keeper in {directory} (exit after {persist:g} s idle)")
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_EVERY)
            if await holder.sweep():
                break
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server.close()
        await holder.close()
        _log("exiting")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    return asyncio.run(serve(Path(args[0]), float(args[1])))


if __name__ == "__main__":
    sys.exit(main())
