"""A `.part` file being filled: its running sha256, and the thread that writes it.

The download appends to a `.part` file; hashing as the bytes land means a
finished file needs no second read to verify.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from rbee_worker.protocol.node_events import Emitter

#: bytes per read of a file being hashed
BATCH = 4 << 20
#: received chunks waiting for the writer thread before the reader waits
DEPTH = 8


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

    def catch_up(self, offset: int, emitter: Emitter | None = None) -> None:
        """Writing resumes at `offset`: the bytes before it must already be in the hash (blocking)."""
        if offset == self.size:
            return
        self._hash, self.size = hashlib.sha256(), 0
        if offset:
            meter = Meter(emitter, "verify", 0, offset) if emitter else None
            self._hash = _hash_prefix(self.part, offset, meter)
            self.size = offset

    async def start_at(self, offset: int, emitter: Emitter | None = None) -> None:
        """`catch_up` off the event loop."""
        if offset != self.size:
            await asyncio.to_thread(self.catch_up, offset, emitter)

    async def finish(self, emitter: Emitter) -> str:
        """The digest, with a `verify` row that ends full (the bytes were hashed as they came)."""
        size = self.part.stat().st_size
        await self.start_at(size, emitter)
        emitter.progress("verify", size, size, None, force=True)
        return self._hash.hexdigest()

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    async def hexdigest(self) -> str:
        """The digest of the file as it is on disk now (re-hashed if something else wrote to it)."""
        await self.start_at(self.part.stat().st_size)
        return self._hash.hexdigest()


class PartSink:
    """Hashes received bytes on the reading thread and writes them on a thread of its own.

    A chunk is hashed right after the read that brought it in, while it is still
    in that core's cache: sha256 of cache-hot bytes runs ~1.5x faster here than of
    bytes last touched on another core, and the hash is the download's largest
    cost. The write, a copy into the page cache, overlaps the next read on a
    single writer thread (so chunks land in order); up to `DEPTH` chunks wait for
    it before the reader does.
    """

    def __init__(self, f: BinaryIO, digest: PartDigest) -> None:
        self._f, self._digest = f, digest
        self._pending: deque[Future[Any]] = deque()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="rbee-download-write")

    def add(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self._pending.append(self._writer.submit(self._f.write, chunk))
        while len(self._pending) > DEPTH:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for every write; the first failed one raises, after the rest have landed."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._writer.shutdown(wait=True)
            self._pending.clear()


def _hash_prefix(path: Path, length: int, meter: Meter | None = None) -> hashlib._Hash:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while length > 0 and (chunk := f.read(min(BATCH, length))):
            h.update(chunk)
            length -= len(chunk)
            if meter:
                meter.add(len(chunk))
    return h
