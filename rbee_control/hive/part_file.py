"""A `.part` file being filled: its running sha256, and the threads that write and hash it.

The download and the local import both append to a `.part` file; hashing as the
bytes land means a finished file needs no second read to verify, and doing both
off the event loop keeps the reading side at the network's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from rbee_worker.protocol.node_events import Emitter

#: bytes per write and hash batch (and per read of a file being hashed)
BATCH = 4 << 20
#: batches written and hashed while the next ones are read
DEPTH = 2


class Meter:
    """Bytes and speed for progress events; speed counts only this attempt's bytes."""

    def __init__(self, emitter: Emitter, phase: str, start: int, total: int | None) -> None:
        self.emitter, self.phase, self.done, self.total = emitter, phase, start, total
        self._start, self._t0 = start, time.monotonic()

    def add(self, n: int, force: bool = False) -> None:
        self.done += n
        elapsed = time.monotonic() - self._t0
        speed = (self.done - self._start) / elapsed if elapsed > 0 else None
        self.emitter.progress(self.phase, self.done, self.total, speed, force=force)


class PartDigest:
    """The sha256 of a `.part` file, kept current while bytes are appended to it.

    A download hashes each chunk as it writes it, so a finished file needs no
    second read to verify (for a multi-GB model that read costs as long as a fast
    LAN download). A resumed file is hashed once from disk up to where it resumes.
    """

    def __init__(self, part: Path) -> None:
        self.part = part
        self._hash = hashlib.sha256()
        self.size = 0

    async def start_at(self, offset: int, emitter: Emitter | None = None) -> None:
        """Writing resumes at `offset`: the bytes before it must already be in the hash."""
        if offset == self.size:
            return
        self._hash, self.size = hashlib.sha256(), 0
        if offset:
            meter = Meter(emitter, "verify", 0, offset) if emitter else None
            self._hash = await asyncio.to_thread(_hash_prefix, self.part, offset, meter)
            self.size = offset

    async def finish(self, emitter: Emitter) -> str:
        """The digest, with a `verify` row that ends full (the bytes were hashed as they came)."""
        size = self.part.stat().st_size
        await self.start_at(size, emitter)
        emitter.progress("verify", size, size, None, force=True)
        return self._hash.hexdigest()

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def update_all(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.update(chunk)

    async def hexdigest(self) -> str:
        """The digest of the file as it is on disk now (re-hashed if something else wrote to it)."""
        await self.start_at(self.part.stat().st_size)
        return self._hash.hexdigest()


class PartSink:
    """Writes and hashes received bytes off the event loop, so the event loop only reads.

    Hashing on the event loop held a loopback download to half of curl's speed. Each
    batch of `BATCH` bytes goes to a writer thread and a hasher thread at once (both
    release the GIL), each a single thread so batches land in order; up to `DEPTH`
    batches are in flight before reading waits.
    """

    def __init__(self, f: BinaryIO, digest: PartDigest) -> None:
        self._f, self._digest = f, digest
        self._buf: list[bytes] = []
        self._buffered = 0
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="rbee-download-write")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="rbee-download-hash")

    async def add(self, chunk: bytes) -> None:
        self._buf.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= BATCH:
            await self._flush(DEPTH)

    async def _flush(self, depth: int) -> None:
        if self._buf:
            batch, self._buf, self._buffered = self._buf, [], 0
            loop = asyncio.get_running_loop()
            written = loop.run_in_executor(self._writer, self._f.writelines, batch)
            hashed = loop.run_in_executor(self._hasher, self._digest.update_all, batch)
            self._pending.append(asyncio.gather(written, hashed))
        while len(self._pending) > depth:
            await asyncio.shield(self._pending.popleft())  # a cancelled download still lands what it received

    async def close(self) -> None:
        try:
            await self._flush(0)
        finally:
            for pending in self._pending:  # after a failure: let the rest land before the files close
                with contextlib.suppress(BaseException):
                    await asyncio.shield(pending)
            self._pending.clear()
            self._writer.shutdown()
            self._hasher.shutdown()


def _hash_prefix(path: Path, length: int, meter: Meter | None = None) -> hashlib._Hash:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while length > 0 and (chunk := f.read(min(BATCH, length))):
            h.update(chunk)
            length -= len(chunk)
            if meter:
                meter.add(len(chunk))
    return h
