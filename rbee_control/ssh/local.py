"""`transport: local`: node commands as subprocesses of the keeper, same contract as SSH.

The embedded default node uses this, so a first-time user needs no sshd. Each
command gets its own session (process group), so cancelling kills the command
and anything it started, and a Ctrl-C in the terminal reaches only the keeper,
which then cancels deliberately.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from rbee_control.inventory.model import Node
from rbee_control.ssh.command import NodePath, check_argv, local_argv, local_env, signal_exit_status
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

LINE_LIMIT = 16 * 1024 * 1024
COPY_BLOCK = 1024 * 1024


class LocalCommandStream(CommandStream):
    """A subprocess; a program that cannot be executed reports 127/126 like a shell would."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str] | None,
        stdin: bytes | None,
        on_stderr: StderrCallback | None,
    ) -> None:
        super().__init__(argv, on_stderr)
        self._env = env
        self._stdin = stdin
        self._proc: asyncio.subprocess.Process | None = None
        self._spawn_failure: tuple[int, str] | None = None
        self._stdin_task: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        argv = local_argv(self.argv)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if self._stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=local_env(self._env),
                start_new_session=True,
                limit=LINE_LIMIT,
            )
        except FileNotFoundError:
            self._spawn_failure = (127, f"{argv[0]}: command not found\n")
        except PermissionError:
            self._spawn_failure = (126, f"{argv[0]}: permission denied\n")
        if self._spawn_failure is not None:
            self._keep_stderr(self._spawn_failure[1])
            return
        assert self._proc is not None and self._proc.stderr is not None
        self.pid = self._proc.pid
        self._stderr_task = asyncio.create_task(
            self._pump_stderr(self._proc.stderr.readline, expect_pid=False)
        )
        if self._stdin is not None:
            self._stdin_task = asyncio.create_task(self._feed(self._stdin))

    async def _feed(self, data: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
        self._proc.stdin.close()

    async def _readline(self) -> bytes:
        if self._proc is None or self._proc.stdout is None:
            return b""
        return await self._proc.stdout.readline()

    async def _read_rest(self) -> bytes:
        if self._proc is None or self._proc.stdout is None:
            return b""
        return await self._proc.stdout.read()

    async def _exit_status(self) -> int:
        if self._proc is None:
            return self._spawn_failure[0] if self._spawn_failure else 255
        code = await self._proc.wait()
        if self._stdin_task is not None:
            await self._stdin_task
        return signal_exit_status(-code) if code < 0 else code

    async def _terminate(self, grace: float) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), grace)
        except TimeoutError:
            self._signal_group(signal.SIGKILL)
            await self._proc.wait()
        if self._stdin_task is not None:
            self._stdin_task.cancel()

    def _signal_group(self, signum: int) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)


class LocalTransport(NodeTransport):
    """Runs a `transport: local` node's commands on this machine."""

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self._streams: set[CommandStream] = set()

    def stream(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        on_stderr: StderrCallback | None = None,
    ) -> CommandStream:
        proc = LocalCommandStream(check_argv(argv), env, stdin, on_stderr)
        proc.on_done = self._streams.discard
        self._streams.add(proc)
        return proc

    async def unix_exchange(self, path: str, request: bytes, *, limit: int = UNIX_REPLY_LIMIT) -> bytes:
        target = NodePath(path).local()
        try:
            reader, writer = await asyncio.open_unix_connection(target)
        except OSError as exc:  # no socket file, or nobody listening on it
            raise socket_unavailable(self.node, path, exc.strerror or str(exc)) from None
        try:
            writer.write(request)
            await writer.drain()
            return await read_reply(self.node, path, reader.read, limit)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def put(
        self,
        local_path: str | os.PathLike[str],
        remote_path: str,
        progress_cb: ProgressCallback | None = None,
        *,
        resume: bool = True,
    ) -> PutResult:
        source = Path(local_path)
        target = Path(NodePath(remote_path).local())
        total = source_size(source)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            return await self._copy(source, target, total, progress_cb, resume)
        except OSError as exc:
            raise put_failed(self.node, target, exc) from exc

    async def _copy(
        self, source: Path, target: Path, total: int, progress_cb: ProgressCallback | None, resume: bool
    ) -> PutResult:
        offset = _resume_offset(target, total) if resume else 0
        digest = await hash_prefix(source, offset)
        if progress_cb is not None:
            progress_cb(offset, total)
        done = offset
        with open(source, "rb") as src, open(target, "r+b" if offset else "wb") as dst:
            src.seek(offset)
            dst.seek(offset)
            dst.truncate()
            while block := src.read(COPY_BLOCK):
                digest.update(block)
                dst.write(block)
                done += len(block)
                if progress_cb is not None:
                    progress_cb(done, total)
                await asyncio.sleep(0)
            dst.flush()
            os.fsync(dst.fileno())
        return PutResult(size=total, resumed_from=offset, sha256=digest.hexdigest())

    async def close(self) -> None:
        streams, self._streams = self._streams, set()
        for proc in streams:
            await proc.cancel()


def _resume_offset(target: Path, total: int) -> int:
    """Continue a partial copy only if it is not longer than the source."""
    try:
        size = target.stat().st_size
    except FileNotFoundError:
        return 0
    return size if size <= total else 0
