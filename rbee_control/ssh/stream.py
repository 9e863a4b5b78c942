"""A running node command: stdout lines as they arrive, stderr on the side, exit status at the end.

Used as an async context manager so that leaving the block early (an exception,
`break`, Ctrl-C) kills the command on the node instead of orphaning it:

    async with transport.stream(argv) as proc:
        async for line in proc:
            ...
        result = await proc.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

from rbee_control.ssh.command import PID_MARKER, CommandResult
from rbee_worker.protocol.errors import ErrorCode, RbeeError

StderrCallback = Callable[[str], None]
STDERR_KEEP_BYTES = 256 * 1024
DEFAULT_GRACE = 3.0


def decode_line(raw: bytes) -> str:
    """One line of output without its line ending; undecodable bytes become U+FFFD."""
    text = raw.decode("utf-8", errors="replace")
    if text.endswith("\n"):
        text = text[:-1]
    return text[:-1] if text.endswith("\r") else text


class CommandStream(ABC):
    """The transport-independent half: line decoding, stderr capture, lifecycle."""

    def __init__(self, argv: list[str], on_stderr: StderrCallback | None = None) -> None:
        self.argv = argv
        self._on_stderr = on_stderr
        self._stderr: deque[str] = deque()
        self._stderr_size = 0
        self._stderr_task: asyncio.Task[None] | None = None
        self._stdout_done = False
        self._result: CommandResult | None = None
        self._cancelled = False
        self.pid: int | None = None
        self._pid_known = asyncio.Event()
        self._released = False
        self._started = False
        #: Called once when the stream ends (finished or cancelled); transports use it to forget it.
        self.on_done: Callable[[CommandStream], None] | None = None

    # -- public ---------------------------------------------------------------------

    async def __aenter__(self) -> CommandStream:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._result is None:
            if exc_type is None and self._stdout_done:
                await self.wait()
            else:
                await self.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self.lines()

    async def start(self) -> None:
        """Start the command (done by `async with`, `lines()` or `wait()` if not yet)."""
        if not self._started:
            self._started = True
            await self._start()

    async def lines(self) -> AsyncIterator[str]:
        """stdout, one decoded line at a time, as soon as the node writes it."""
        await self.start()
        while not self._stdout_done:
            raw = await self._readline()
            if not raw:
                self._stdout_done = True
                return
            yield decode_line(raw)

    async def wait(self) -> CommandResult:
        """Wait for the exit; `stdout` holds whatever `lines()` did not consume."""
        if self._result is not None:
            return self._result
        if self._cancelled:
            raise RbeeError(
                ErrorCode.REQUEST_CANCELED, f"command was cancelled: {shlex.join(self.argv)[:200]}"
            )
        await self.start()
        rest = b"" if self._stdout_done else await self._read_rest()
        self._stdout_done = True
        if self._stderr_task is not None:
            await self._stderr_task
        status = await self._exit_status()
        self._result = CommandResult(status, rest.decode("utf-8", errors="replace"), self.stderr)
        await self._finish()
        return self._result

    async def cancel(self, grace: float = DEFAULT_GRACE) -> None:
        """Stop the command on the node (TERM, then KILL after `grace` seconds) and free its channel."""
        if self._result is not None or self._cancelled:
            return
        self._cancelled = True
        if not self._started:
            await self._finish()
            return
        try:
            await self._terminate(grace)
        finally:
            if self._stderr_task is not None and not self._stderr_task.done():
                self._stderr_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._stderr_task
            await self._finish()

    @property
    def stderr(self) -> str:
        """stderr so far (the last `STDERR_KEEP_BYTES` of it)."""
        return "".join(self._stderr)

    @property
    def finished(self) -> bool:
        return self._result is not None or self._cancelled

    # -- for subclasses -------------------------------------------------------------

    @abstractmethod
    async def _start(self) -> None:
        """Start the process (and `_pump_stderr`)."""

    @abstractmethod
    async def _readline(self) -> bytes:
        """Next stdout line with its ending; b'' at EOF."""

    @abstractmethod
    async def _read_rest(self) -> bytes:
        """All remaining stdout."""

    @abstractmethod
    async def _exit_status(self) -> int:
        """Wait for the process to end; its shell-style exit status."""

    @abstractmethod
    async def _terminate(self, grace: float) -> None:
        """Kill the process if it still runs."""

    async def _release(self) -> None:  # noqa: B027 - optional hook
        """Give back whatever the stream holds (a channel slot); called once."""

    async def _finish(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            await self._release()
        finally:
            if self.on_done is not None:
                self.on_done(self)

    async def _pump_stderr(self, readline: Callable[[], Awaitable[bytes]], *, expect_pid: bool) -> None:
        """Collect stderr; the first `rbee-pid:` line (from the SSH preamble) is taken, not shown."""
        while True:
            raw = await readline()
            if not raw:
                self._pid_known.set()
                return
            text = raw.decode("utf-8", errors="replace")
            if expect_pid and not self._pid_known.is_set() and text.startswith(PID_MARKER):
                with contextlib.suppress(ValueError):
                    self.pid = int(text[len(PID_MARKER) :].strip())
                self._pid_known.set()
                continue
            self._keep_stderr(text)
            if self._on_stderr is not None:
                self._on_stderr(decode_line(raw))

    def _keep_stderr(self, text: str) -> None:
        self._stderr.append(text)
        self._stderr_size += len(text)
        while self._stderr_size > STDERR_KEEP_BYTES and len(self._stderr) > 1:
            self._stderr_size -= len(self._stderr.popleft())

    async def _wait_pid(self, timeout: float) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pid_known.wait(), timeout)
        return self.pid
