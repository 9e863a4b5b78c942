"""`NodeTransport`: the one way the keeper acts on a node, whether over SSH or locally.

Callers write `await transport.run([...])`, `transport.stream([...])` and
`await transport.put(src, dst)` and never learn which transport they hold;
`LocalTransport` and `SshTransport` are held to the same semantics by the tests.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shlex
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rbee_control.inventory.model import Node
from rbee_control.ssh.command import CommandResult
from rbee_control.ssh.stream import CommandStream, StderrCallback
from rbee_worker.protocol.errors import ErrorCode, RbeeError

ProgressCallback = Callable[[int, int], None]
#: A status or catalog answer is a few KB (chat templates a few more); anything past this is not one.
UNIX_REPLY_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PutResult:
    """An upload: the file's full size, the offset it resumed from (0 for a fresh copy), and the
    sha256 of the bytes the keeper read (its prefix too), for the node to check what it wrote."""

    size: int
    resumed_from: int
    sha256: str

    @property
    def sent(self) -> int:
        return self.size - self.resumed_from


class NodeTransport(ABC):
    """Run commands on, and copy files to, one node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def __aenter__(self) -> NodeTransport:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:  # noqa: B027 - optional hook; local nodes need no connection
        """Open the connection now, so errors surface before the first command."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connection; running streams are killed."""

    @abstractmethod
    def stream(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        on_stderr: StderrCallback | None = None,
    ) -> CommandStream:
        """A command to start with `async with` (see `CommandStream`)."""

    @abstractmethod
    async def unix_exchange(self, path: str, request: bytes, *, limit: int = UNIX_REPLY_LIMIT) -> bytes:
        """Send `request` to the Unix socket `path` on the node and read until the peer closes.

        Over SSH this is one streamlocal channel on the open connection (no process on
        the node). A socket nobody listens on, or an sshd that forbids streamlocal
        forwarding, raises `socket_unavailable` (HIVE_NOT_RUNNING) so callers can fall
        back to running a command. A `~/` path means the node user's home.
        """

    @abstractmethod
    async def put(
        self,
        local_path: str | os.PathLike[str],
        remote_path: str,
        progress_cb: ProgressCallback | None = None,
        *,
        resume: bool = True,
    ) -> PutResult:
        """Copy a file to the node, continuing a partial copy at `remote_path` when `resume`.

        A leading `~/` in `remote_path` means the node user's home. A resume trusts
        the remote prefix only by its size: the caller has the node hash what it
        wrote against `PutResult.sha256` (and starts over on a mismatch).
        """

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        """Run to completion and collect output; on `timeout` the command is killed (REQUEST_TIMEOUT)."""
        try:
            async with asyncio.timeout(timeout), self.stream(argv, env=env, stdin=stdin) as proc:
                return await proc.wait()
        except TimeoutError:
            raise RbeeError(
                ErrorCode.REQUEST_TIMEOUT,
                f"command on node {self.node.name} timed out after {timeout:g}s: {shlex.join(argv)[:200]}",
                details={"node": self.node.name, "timeout": timeout},
            ) from None


HASH_BLOCK = 1 << 20


def socket_unavailable(node: Node, path: str, why: str) -> RbeeError:
    return RbeeError(
        ErrorCode.HIVE_NOT_RUNNING,
        f"no answer on {path} on node {node.name}: {why}",
        details={"node": node.name, "socket": path, "reason": why},
    )


async def read_reply(node: Node, path: str, read: Callable[[int], Awaitable[bytes]], limit: int) -> bytes:
    """Everything the peer sends until it closes, refusing more than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await read(65536):
        size += len(chunk)
        if size > limit:
            raise RbeeError(
                ErrorCode.INTERNAL_ERROR,
                f"the answer on {path} on node {node.name} is larger than {limit} bytes",
                details={"node": node.name, "socket": path},
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def hash_prefix(path: Path, length: int) -> hashlib._Hash:
    """sha256 of the first `length` bytes of a local file (a resumed upload's part already sent)."""

    def run() -> hashlib._Hash:
        digest, left = hashlib.sha256(), length
        with open(path, "rb") as f:
            while left > 0 and (chunk := f.read(min(HASH_BLOCK, left))):
                digest.update(chunk)
                left -= len(chunk)
        return digest

    return await asyncio.to_thread(run)


def source_size(path: Path) -> int:
    """Size of a local file about to be uploaded, or a clear error naming it."""
    try:
        return path.stat().st_size
    except OSError as exc:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"cannot read {path}: {exc.strerror or exc}",
            details={"path": str(path)},
        ) from None


def put_failed(node: Node, target: object, exc: BaseException) -> RbeeError:
    no_space = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    return RbeeError(
        ErrorCode.DISK_FULL if no_space else ErrorCode.INTERNAL_ERROR,
        f"upload to node {node.name} ({target}) failed: {getattr(exc, 'strerror', None) or exc}",
        status=507 if no_space else 500,
        details={"node": node.name, "path": str(target)},
    )
