"""Moving model bytes into a `.part` file: HTTP with Range resume and retries, or a local import.

The `.part` file is the checkpoint: it survives a dropped connection, a killed
process or a full disk, and the next attempt (or the next `models add`) resumes
from its size. Nothing here touches the catalog; `models.py` decides what a
finished `.part` file is worth.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import random
import re
import shutil
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.node_events import Emitter

from .body_reader import READ_SLICE, body_chunks
from .part_file import BATCH, Meter, PartDigest, PartSink
from .refs import Source, TransientError

CHUNK = 1 << 20
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


#: The largest download by default (256 GiB: above any single GGUF file published today).
DEFAULT_MAX_BYTES = 256 << 30


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """6 attempts with 100, 200, 400, 800, 1600 ms (±50 % jitter) between them.

    `RBEE_HIVE_DOWNLOAD_BACKOFF` (seconds) changes the first delay and
    `RBEE_HIVE_DOWNLOAD_STALL` the seconds without a byte before a read counts as failed.
    `max_bytes` (`RBEE_HIVE_MAX_MODEL_BYTES`, `models add --max-bytes`) caps a download.
    """

    attempts: int = 6
    base_delay: float = 0.1
    stall_timeout: float = 60.0
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_env(cls) -> RetryPolicy:
        env = os.environ
        return cls(
            attempts=int(env.get("RBEE_HIVE_DOWNLOAD_ATTEMPTS", 6)),
            base_delay=float(env.get("RBEE_HIVE_DOWNLOAD_BACKOFF", 0.1)),
            stall_timeout=float(env.get("RBEE_HIVE_DOWNLOAD_STALL", 60.0)),
            max_bytes=int(env.get("RBEE_HIVE_MAX_MODEL_BYTES", DEFAULT_MAX_BYTES)),
        )

    def delay(self, failures: int) -> float:
        return self.base_delay * 2 ** (failures - 1) * random.uniform(0.5, 1.5)


def _disk_full(part: Path, needed: int | None = None) -> RbeeError:
    free = shutil.disk_usage(part.parent).free
    details: dict[str, object] = {"path": str(part), "free_bytes": free}
    if needed is not None:
        details["needed_bytes"] = needed
    kept = part.exists() and part.stat().st_size > 0
    return RbeeError(
        ErrorCode.DISK_FULL,
        f"not enough disk space in {part.parent}" + (" (partial download kept for resume)" if kept else ""),
        details=details,
        hint="free some space (rbee-hive models rm NAME) and run the same command again",
    )


async def download(
    resolve: Callable[[], Awaitable[Source]],
    part: Path,
    emitter: Emitter,
    policy: RetryPolicy,
    digest: PartDigest | None = None,
) -> Source:
    """Fill `part` from the source `resolve()` names; return the source (with size) once whole.

    `digest`, when given, follows every byte written, for a verify without a second read.
    """
    digest = digest or PartDigest(part)
    source: Source | None = None
    last: Exception | None = None
    timeout = httpx.Timeout(connect=10.0, read=policy.stall_timeout, write=30.0, pool=10.0)

    def no_downgrade(request: httpx.Request) -> None:
        """Every request of a redirect chain passes here before it is sent."""
        if source is not None and source.url.startswith("https:") and request.url.scheme != "https":
            raise _downgrade(source.url, str(request.url))

    hooks = {"request": [no_downgrade]}
    # a blocking client, driven from one thread per attempt: see `_fetch_in_thread`
    with httpx.Client(timeout=timeout, follow_redirects=True, event_hooks=hooks, verify=_tls()) as client:
        for attempt in range(1, policy.attempts + 1):
            if attempt > 1:
                delay = policy.delay(attempt - 1)
                emitter.log(
                    f"retrying download (attempt {attempt}/{policy.attempts}) in {delay:.2f} s: {last}"
                )
                await asyncio.sleep(delay)
            try:
                if source is None:
                    source = await resolve()
                args = (client, source, part, emitter, digest, policy.max_bytes)
                await _fetch_in_thread(functools.partial(_fetch_once, *args))
                return source
            except TransientError as exc:
                last = exc
            except httpx.TransportError as exc:
                last = TransientError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    raise RbeeError(
        ErrorCode.DOWNLOAD_FAILED,
        f"download failed after {policy.attempts} attempts: {last}",
        details={
            "url": source.url if source else None,
            "attempts": policy.attempts,
            "last_error": str(last),
            "partial_bytes": part.stat().st_size if part.exists() else 0,
        },
        hint="run the same command again: it resumes from the partial file",
    )


async def _fetch_in_thread(fetch: Callable[[threading.Event], None]) -> None:
    """Run one attempt on a thread of its own; a cancelled attempt stops and lands what it received.

    The body is read, hashed and handed to the writer on that thread with blocking
    calls: reading it on the event loop and hashing elsewhere held a loopback
    download to 0.82x curl, mostly because sha256 then read bytes another core had
    touched last. Cancelling sets `stop`, which the body reader sees within
    `READ_SLICE`; a thread still waiting for a connection or for headers is a
    daemon, left to its timeouts, so Ctrl-C never waits for a silent server.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    stop = threading.Event()

    def run() -> None:
        outcome: BaseException | None = None
        try:
            fetch(stop)
        except BaseException as exc:
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(_settle, done, outcome)

    threading.Thread(target=run, name="rbee-download", daemon=True).start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(done, 2 * READ_SLICE)
        raise


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.cancelled():
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)


@functools.cache
def _tls() -> ssl.SSLContext:
    """One verifying context per process: loading the CA bundle costs ~20 ms, a tenth of a 100 MB download."""
    return httpx.create_ssl_context()


def _downgrade(url: str, to: str) -> RbeeError:
    return RbeeError(
        ErrorCode.DOWNLOAD_FAILED,
        f"refusing a redirect from https to {to.split(':', 1)[0]}: {url} -> {to}",
        status=502,
        details={"url": url, "redirect": to},
        hint="ask the server's owner to keep https, or download the file yourself and add it with file:",
    )


def _too_large(url: str, size: int, max_bytes: int) -> RbeeError:
    return RbeeError(
        ErrorCode.DOWNLOAD_FAILED,
        f"{url} is {size} bytes, over the limit of {max_bytes} bytes",
        status=413,
        details={"url": url, "size": size, "max_bytes": max_bytes},
        hint="if the file is really that big: models add --max-bytes N (or RBEE_HIVE_MAX_MODEL_BYTES)",
    )


def _overrun(url: str, part: Path, limit: int, declared: bool) -> RbeeError:
    part.unlink(missing_ok=True)
    what = "the size it declared" if declared else "the download limit"
    return RbeeError(
        ErrorCode.DOWNLOAD_FAILED,
        f"{url} sent more than {what} ({limit} bytes); partial file deleted",
        status=502,
        details={"url": url, "limit": limit, "declared": declared},
    )


def _fetch_once(
    client: httpx.Client,
    source: Source,
    part: Path,
    emitter: Emitter,
    digest: PartDigest,
    max_bytes: int,
    stop: threading.Event,
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if source.size is not None:
        if offset == source.size and offset > 0:
            return
        if offset > source.size:
            part.unlink()
            offset = 0
    headers = {**source.headers, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", source.url, headers=headers) as resp:
        status = resp.status_code
        if status == 416:
            m = re.search(r"/(\d+)", resp.headers.get("content-range", ""))
            if m and int(m.group(1)) == offset:
                source.size = offset
                return
            part.unlink(missing_ok=True)
            raise TransientError("server refused to resume; starting over")
        if status == 404:
            raise RbeeError(
                ErrorCode.MODEL_NOT_FOUND, f"not found: {source.url}", details={"url": source.url}
            )
        if status in (401, 403):
            raise RbeeError(
                ErrorCode.DOWNLOAD_FAILED,
                f"access denied (HTTP {status}): {source.url}",
                status=403,
                details={"url": source.url, "status": status},
                hint="for Hugging Face models export HF_TOKEN=... on the node",
            )
        if status >= 500 or status in (408, 429):
            raise TransientError(f"HTTP {status}")
        if status not in (200, 206):
            raise RbeeError(
                ErrorCode.DOWNLOAD_FAILED,
                f"unexpected HTTP {status} from {source.url}",
                details={"url": source.url, "status": status},
            )
        if status == 206:
            m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("content-range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise TransientError("server sent the wrong range; starting over")
            total: int | None = int(m.group(3)) if m.group(3) != "*" else source.size
        else:
            if offset:
                emitter.log("server does not support resume; starting over")
            offset = 0
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else source.size
        if total is not None:
            if total > max_bytes:
                raise _too_large(source.url, total, max_bytes)
            source.size = total
            if shutil.disk_usage(part.parent).free < total - offset:
                raise _disk_full(part, total - offset)
        limit = total if total is not None else max_bytes
        if offset:
            emitter.log(f"resuming at byte {offset}")
        meter = Meter(emitter, "download", offset, total)
        meter.add(0, force=True)
        digest.catch_up(offset, emitter)
        overrun = False
        try:
            with part.open("ab" if offset else "wb") as f:
                sink = PartSink(f, digest)
                try:
                    # unbuffered: a drop loses nothing
                    for chunk in body_chunks(resp, client.timeout.read, stop):
                        if meter.done + len(chunk) > limit:
                            overrun = True
                            break
                        sink.add(chunk)
                        meter.add(len(chunk))
                finally:
                    sink.close()  # what was received is on disk before any retry resumes
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(part) from None
            raise
        if overrun:
            raise _overrun(source.url, part, limit, declared=total is not None)
        meter.add(0, force=True)
    if total is not None and meter.done != total:
        raise TransientError(f"connection closed at byte {meter.done} of {total}")


async def import_file(src: Path, part: Path, emitter: Emitter, consume: bool = False) -> str:
    """Bring a node-local file in: a hard link when on the same filesystem, else a copy.

    `consume` (a file the keeper pushed into the hive's own `incoming/`) moves it
    instead: a pushed copy left linked to a catalogued file would let the next
    push (resuming into the same name) write into that model.
    """
    try:
        size = src.stat().st_size
    except OSError as exc:
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND,
            f"{src}: {exc.strerror}",
            details={"path": str(src)},
        ) from None
    part.unlink(missing_ok=True)
    try:
        if consume:
            os.replace(src, part)
        else:
            os.link(src, part)
        emitter.progress("import", size, size, None, force=True)
        return "move" if consume else "link"
    except OSError:
        pass
    if shutil.disk_usage(part.parent).free < size:
        raise _disk_full(part, size)
    meter = Meter(emitter, "import", 0, size)
    meter.add(0, force=True)

    def copy() -> None:
        with src.open("rb") as fin, part.open("wb") as fout:
            while chunk := fin.read(CHUNK):
                fout.write(chunk)
                meter.add(len(chunk))

    try:
        await asyncio.to_thread(copy)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(part) from None
        raise
    meter.add(0, force=True)
    if consume:
        src.unlink(missing_ok=True)
    return "copy"


async def sha256_file(path: Path, emitter: Emitter | None = None) -> str:
    """Hash in a thread (hashlib releases the GIL), with `verify` progress for big files."""
    size = path.stat().st_size
    meter = Meter(emitter, "verify", 0, size) if emitter else None

    def run() -> str:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(BATCH):
                h.update(chunk)
                if meter:
                    meter.add(len(chunk))
        if meter:
            meter.add(0, force=True)  # the last event always passes: the bar ends at 100 %
        return h.hexdigest()

    return await asyncio.to_thread(run)
