"""`rbee-hive logs [--worker ID] [--lines N] [--follow]`: a node's log files, for the keeper to read.

The keeper runs this over SSH (`rbee-keeper logs --node NAME …`), so the worker id
is checked here too before it becomes a file name. `--follow` polls the file and
reopens it when it is rotated or replaced, until the reader goes away.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .paths import HivePaths

POLL_S = 0.2
MAX_LINES = 100_000


def log_file(paths: HivePaths, worker_id: str | None) -> Path:
    """The hive's log, or one worker's (the id is validated: it becomes a path)."""
    path = paths.worker_log(worker_id) if worker_id else paths.hive_log
    if not path.is_file():
        what = f"worker {worker_id}" if worker_id else "the hive"
        raise RbeeError(
            ErrorCode.NOT_FOUND,
            f"no log for {what} on this node ({path.name})",
            status=404,
            details={"path": str(path)},
            hint="rbee-keeper worker list --node <node> shows the worker ids"
            if worker_id
            else "rbee-keeper hive start --node <node>",
        )
    return path


def last_lines(path: Path, count: int, end: int | None = None) -> bytes:
    """The last `count` lines before byte `end` (default: the end), read backwards (a log may be large)."""
    if count <= 0:
        return b""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END) if end is None else end
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= count:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            data = f.read(min(step, end - pos)) + data
    lines = data.splitlines(keepends=True)[-count:]
    return b"".join(lines)


def follow(
    path: Path, write: Callable[[bytes], None], stop: Callable[[], bool] = lambda: False, start: int = 0
) -> None:
    """Write what `path` holds from byte `start` on, as it grows; a rotated file is read from its start."""
    f: BinaryIO = path.open("rb")
    f.seek(start)
    try:
        while not stop():
            chunk = f.read(1 << 16)
            if chunk:
                write(chunk)
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino != os.fstat(f.fileno()).st_ino or st.st_size < f.tell()):
                f.close()
                f = path.open("rb")  # rotated: the new file is read from its first byte
                continue
            time.sleep(POLL_S)
    finally:
        f.close()


def print_logs(paths: HivePaths, worker_id: str | None, lines: int, follow_on: bool) -> None:
    if not 0 <= lines <= MAX_LINES:
        raise RbeeError(ErrorCode.INVALID_REQUEST, f"--lines must be between 0 and {MAX_LINES}")
    path = log_file(paths, worker_id)
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()  # a reader gone (SSH channel closed) ends the follow with BrokenPipeError

    end = path.stat().st_size  # one offset for both: no line shown twice or lost in between
    write(last_lines(path, lines, end))
    if follow_on:
        with contextlib.suppress(BrokenPipeError):
            follow(path, write, stop=lambda: os.getppid() == 1, start=end)  # orphaned: nobody reads any more
