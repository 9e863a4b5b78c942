"""`transport: ssh`: one asyncssh connection per node, at most 8 channels at a time.

sshd allows 10 sessions per connection (MaxSessions); the semaphore keeps two in
reserve, one of which cancellation uses to `kill` a command by pid when the server
ignores SSH signal requests (OpenSSH does for root logins). The connection is
opened lazily and re-opened once if it dropped between commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import shlex
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import asyncssh

from rbee_control.inventory.model import Node
from rbee_control.ssh.command import check_argv, remote_command_line, signal_exit_status
from rbee_control.ssh.connect import ATTEMPTS, BACKOFF, default_connect_timeout, open_connection
from rbee_control.ssh.failures import connection_lost
from rbee_control.ssh.held_client import ConnectionHolder
from rbee_control.ssh.held_paths import HolderUnavailable
from rbee_control.ssh.known_hosts import KnownHosts
from rbee_control.ssh.stream import CommandStream, StderrCallback
from rbee_control.ssh.transport import (
    UNIX_REPLY_LIMIT,
    NodeTransport,
    ProgressCallback,
    PutResult,
    hash_prefix,
    put_failed,
    read_reply,
    socket_unavailable,
    source_size,
)
from rbee_worker.protocol.errors import ErrorCode, RbeeError

MAX_CHANNELS = 8
#: OpenSSH's sftp-server drops requests over 256 KiB; leave room for the request header.
SFTP_BLOCK = 256 * 1024 - 1024
SFTP_REQUESTS = 16
KILL_TIMEOUT = 5.0
PID_WAIT = 2.0
CHANNEL_RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4)
T = TypeVar("T")
NETWORK_ERRORS: tuple[type[BaseException], ...] = (asyncssh.Error, OSError)
KILL_GIVE_UP: tuple[type[BaseException], ...] = (*NETWORK_ERRORS, TimeoutError)


class SshCommandStream(CommandStream):
    """A command in its own SSH channel (session)."""

    def __init__(
        self,
        transport: SshTransport,
        argv: list[str],
        env: Mapping[str, str] | None,
        stdin: bytes | None,
        on_stderr: StderrCallback | None,
    ) -> None:
        super().__init__(argv, on_stderr)
        self._transport = transport
        self._command = remote_command_line(argv, env)
        self._stdin = stdin
        self._proc: asyncssh.SSHClientProcess[bytes] | None = None
        self._holding = False
        self._feeder: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        await self._transport.channels.acquire()
        self._holding = True
        try:
            proc = await self._transport.open_channel(
                lambda conn: conn.create_process(self._command, encoding=None)
            )
        except RbeeError:
            await self._finish()
            raise
        except NETWORK_ERRORS as exc:
            await self._finish()
            raise connection_lost(self._transport.node.name, exc) from None
        self._proc = proc
        if self._stdin is None:
            proc.stdin.write_eof()
        else:
            self._feeder = asyncio.create_task(self._feed(self._stdin))
        self._stderr_task = asyncio.create_task(self._pump_stderr(self._stderr_line, expect_pid=True))

    async def _stderr_line(self) -> bytes:
        """stderr ends quietly when the connection drops; stdout's reader reports the loss."""
        assert self._proc is not None
        try:
            return await self._proc.stderr.readline()
        except NETWORK_ERRORS:
            return b""

    async def _feed(self, data: bytes) -> None:
        assert self._proc is not None
        with contextlib.suppress(*NETWORK_ERRORS):
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
            self._proc.stdin.write_eof()

    async def _readline(self) -> bytes:
        assert self._proc is not None
        try:
            return await self._proc.stdout.readline()
        except NETWORK_ERRORS as exc:
            raise connection_lost(self._transport.node.name, exc) from None

    async def _read_rest(self) -> bytes:
        assert self._proc is not None
        try:
            return await self._proc.stdout.read()
        except NETWORK_ERRORS as exc:
            raise connection_lost(self._transport.node.name, exc) from None

    async def _exit_status(self) -> int:
        assert self._proc is not None
        await self._proc.wait_closed()
        if self._feeder is not None:
            await self._feeder
        if self._proc.exit_signal:
            name = self._proc.exit_signal[0]
            try:
                return signal_exit_status(signal.Signals[f"SIG{name}"].value)
            except KeyError:
                return 255
        status = self._proc.exit_status
        return 255 if status is None or status < 0 else status

    async def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        drain = asyncio.create_task(_discard(proc.stdout))
        try:
            if proc.exit_status is None and not proc.exit_signal:
                pid = await self._wait_pid(min(grace, PID_WAIT))
                with contextlib.suppress(*NETWORK_ERRORS):
                    proc.send_signal("TERM")
                if pid is not None:
                    await self._transport.kill(pid, "TERM")
                if not await _closed_within(proc, grace):
                    if pid is not None:
                        await self._transport.kill(pid, "KILL")
                    await _closed_within(proc, 1.0)
        finally:
            proc.close()
            drain.cancel()
            if self._feeder is not None:
                self._feeder.cancel()

    async def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._transport.channels.release()


async def _discard(reader: asyncssh.SSHReader[bytes]) -> None:
    """Keep reading so a chatty command being killed is not stalled on a full window."""
    with contextlib.suppress(*NETWORK_ERRORS):
        while await reader.read(65536):
            pass


async def _closed_within(proc: asyncssh.SSHClientProcess[bytes], seconds: float) -> bool:
    try:
        await asyncio.wait_for(proc.wait_closed(), seconds)
    except TimeoutError:
        return False
    return True


class SshTransport(NodeTransport):
    """Runs a `transport: ssh` node's commands over one pinned-host-key asyncssh connection."""

    def __init__(
        self,
        node: Node,
        *,
        known_hosts: KnownHosts | None = None,
        connect_timeout: float | None = None,
        attempts: int = ATTEMPTS,
        backoff: Sequence[float] = BACKOFF,
        max_channels: int = MAX_CHANNELS,
        holder: ConnectionHolder | None = None,
    ) -> None:
        """`holder`: socket exchanges go through the keeper's connection holder, which keeps
        connections between runs; commands still use this transport's own connection."""
        super().__init__(node)
        if node.ssh is None:
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"node {node.name} is not an ssh node")
        self.known_hosts = known_hosts or KnownHosts()
        self.channels = asyncio.Semaphore(max_channels)
        self._timeout = default_connect_timeout() if connect_timeout is None else connect_timeout
        self._attempts = attempts
        self._backoff = tuple(backoff)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._streams: set[CommandStream] = set()
        self._login_dir: str | None = None
        self._holder = holder

    async def connect(self) -> None:
        if self._holder is None:  # with a holder, a run that only reads sockets opens no connection
            await self.connection()

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The open connection, (re)connecting if there is none or it dropped."""
        if self._closed:
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"transport to node {self.node.name} is closed")
        async with self._lock:
            if self._conn is None or self._conn.is_closed():
                self._conn = await open_connection(
                    self.node,
                    self.known_hosts,
                    timeout=self._timeout,
                    attempts=self._attempts,
                    backoff=self._backoff,
                )
            return self._conn

    async def open_channel(self, opener: Callable[[asyncssh.SSHClientConnection], Awaitable[T]]) -> T:
        """Open a channel, retrying briefly while sshd is still freeing sessions that just ended.

        sshd frees a finished session one loop after our close arrives, so a new
        channel opened at once can be refused ("no more sessions") at MaxSessions.
        """
        for delay in (*CHANNEL_RETRY_DELAYS, None):
            conn = await self.connection()
            try:
                return await opener(conn)
            except asyncssh.ChannelOpenError:
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def stream(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        on_stderr: StderrCallback | None = None,
    ) -> CommandStream:
        proc = SshCommandStream(self, check_argv(argv), env, stdin, on_stderr)
        proc.on_done = self._streams.discard
        self._streams.add(proc)
        return proc

    async def kill(self, pid: int, signame: str) -> None:
        """Best-effort `kill -SIG pid` in a channel of its own (outside the channel cap)."""
        command = shlex.join(["kill", f"-{signame}", str(int(pid))])
        for delay in (*CHANNEL_RETRY_DELAYS, None):
            conn = self._conn
            if conn is None or conn.is_closed():
                return
            try:
                await asyncio.wait_for(conn.run(command), KILL_TIMEOUT)
                return
            except asyncssh.ChannelOpenError:
                if delay is None:
                    return
                await asyncio.sleep(delay)
            except KILL_GIVE_UP:
                return

    async def unix_exchange(self, path: str, request: bytes, *, limit: int = UNIX_REPLY_LIMIT) -> bytes:
        """One direct-streamlocal channel (sshd: `AllowStreamLocalForwarding`, on by default)."""
        if self._holder is not None:
            try:
                return await self._holder.exchange(
                    self.node, self.known_hosts.path, self._timeout, path, request, limit
                )
            except HolderUnavailable:
                self._holder = None  # this machine cannot hold connections: go direct from now on
        async with self.channels:
            target = await self._absolute(path)
            try:
                reader, writer = await self.open_channel(lambda conn: conn.open_unix_connection(target))
            except asyncssh.ChannelOpenError as exc:  # no socket, nobody listening, or forbidden
                raise socket_unavailable(self.node, path, exc.reason or "channel refused") from None
            except NETWORK_ERRORS as exc:
                raise connection_lost(self.node.name, exc) from None
            try:
                writer.write(request)
                return await read_reply(self.node, path, reader.read, limit)
            except NETWORK_ERRORS as exc:
                raise connection_lost(self.node.name, exc) from None
            finally:
                writer.close()

    async def _absolute(self, path: str) -> str:
        """sshd opens streamlocal paths as given, not from the login directory: resolve `~/` once."""
        if path != "~" and not path.startswith("~/"):
            return path
        if self._login_dir is None:
            self._login_dir = await self._realpath(".")
        return posixpath.join(self._login_dir, sftp_path(path))

    async def _realpath(self, path: str) -> str:
        resolved = ""
        try:
            sftp = await self.open_channel(lambda conn: conn.start_sftp_client())
            async with sftp:
                resolved = str(await sftp.realpath(path))
        except asyncssh.Error as exc:
            raise connection_lost(self.node.name, exc) from None
        return resolved

    async def put(
        self,
        local_path: str | os.PathLike[str],
        remote_path: str,
        progress_cb: ProgressCallback | None = None,
        *,
        resume: bool = True,
    ) -> PutResult:
        source = Path(local_path)
        total = source_size(source)
        target = sftp_path(remote_path)
        async with self.channels:
            try:
                sftp = await self.open_channel(lambda conn: conn.start_sftp_client())
                async with sftp:
                    parent = posixpath.dirname(target)
                    if parent:
                        await sftp.makedirs(parent, exist_ok=True)
                    offset = await _resume_offset(sftp, target, total) if resume else 0
                    result = await _upload(sftp, source, target, total, offset, progress_cb)
            except (asyncssh.SFTPError, OSError) as exc:
                raise put_failed(self.node, remote_path, exc) from None
            except asyncssh.Error as exc:
                raise connection_lost(self.node.name, exc) from None
        return result

    async def close(self) -> None:
        self._closed = True
        for proc in list(self._streams):
            with contextlib.suppress(Exception):
                await proc.cancel(grace=1.0)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(*NETWORK_ERRORS):
                await conn.wait_closed()


def sftp_path(remote_path: str) -> str:
    """SFTP paths are relative to the login directory (the user's home), so `~/x` is `x`."""
    if remote_path == "~":
        return "."
    if remote_path.startswith("~/"):
        return remote_path[2:] or "."
    return str(remote_path)


async def _resume_offset(sftp: asyncssh.SFTPClient, target: str, total: int) -> int:
    """Continue a partial upload only if it is not longer than the source."""
    try:
        size = (await sftp.stat(target)).size or 0
    except asyncssh.SFTPNoSuchFile:
        return 0
    return size if size <= total else 0


async def _upload(
    sftp: asyncssh.SFTPClient,
    source: Path,
    target: str,
    total: int,
    offset: int,
    progress_cb: ProgressCallback | None,
) -> PutResult:
    """Pipelined writes at explicit offsets: up to SFTP_REQUESTS blocks in flight."""
    block = min(SFTP_BLOCK, sftp.limits.max_write_len or SFTP_BLOCK)
    digest = await hash_prefix(source, offset)
    done = offset
    if progress_cb is not None:
        progress_cb(done, total)
    pending: set[asyncio.Task[int]] = set()
    async with sftp.open(target, "r+b" if offset else "wb") as remote:
        with open(source, "rb") as src:
            src.seek(offset)
            pos = offset
            try:
                while pos < total or pending:
                    while pos < total and len(pending) < SFTP_REQUESTS:
                        data = src.read(min(block, total - pos))
                        if not data:
                            total = pos
                            break
                        digest.update(data)
                        pending.add(asyncio.create_task(remote.write(data, pos)))
                        pos += len(data)
                    if not pending:
                        break
                    finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        done += task.result()
                    if progress_cb is not None:
                        progress_cb(done, total)
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
    return PutResult(size=total, resumed_from=offset, sha256=digest.hexdigest())
