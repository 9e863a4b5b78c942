"""Where the connection holder lives, and whether that place is safe to use.

`$RBEE_SSH_PERSIST_DIR`, else `held/` in the keeper's config directory: per user
and per keeper profile (a second `$RBEE_CONFIG_DIR` gets its own holder). The
socket's name carries the release, so a keeper never talks to a holder of
another version. A directory that another user owns or others may enter is not
used: the keeper then connects directly, as with `RBEE_SSH_PERSIST=0`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
import time
from pathlib import Path

from rbee_control import __version__
from rbee_control.inventory.paths import config_dir

PERSIST_ENV = "RBEE_SSH_PERSIST"
PERSIST_DIR_ENV = "RBEE_SSH_PERSIST_DIR"
#: seconds a held connection outlives its last use (Ansible's ControlPersist: 60 s)
DEFAULT_PERSIST = 300.0
#: sun_path is 108 bytes on Linux, 104 on macOS
SOCKET_PATH_MAX = 100


class HolderUnavailable(Exception):
    """No holder can serve this run; the caller connects directly."""


def persist_seconds() -> float:
    """`$RBEE_SSH_PERSIST` (0 turns holding off); a value that is not a number is the default."""
    raw = os.environ.get(PERSIST_ENV, "").strip()
    if not raw:
        return DEFAULT_PERSIST
    try:
        return max(0.0, float(raw))
    except ValueError:
        return DEFAULT_PERSIST


def holder_dir() -> Path:
    explicit = os.environ.get(PERSIST_DIR_ENV)
    return Path(explicit).expanduser() if explicit else config_dir() / "held"


def control_socket(directory: Path) -> Path:
    return directory / f"keeper-{__version__}.sock"


def lock_file(directory: Path) -> Path:
    return directory / f"keeper-{__version__}.lock"


def checked_dir(directory: Path) -> Path:
    """`directory`, created 0700 if missing; HolderUnavailable if it is not ours alone."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise HolderUnavailable(f"{directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise HolderUnavailable(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise HolderUnavailable(f"{directory} belongs to uid {info.st_uid}")
    if info.st_mode & 0o077:
        raise HolderUnavailable(f"{directory} is open to others (mode {stat.S_IMODE(info.st_mode):o})")
    if len(os.fsencode(control_socket(directory))) > SOCKET_PATH_MAX:
        raise HolderUnavailable(f"{directory}: path too long for a Unix socket")
    return directory


def holder_pid(directory: Path) -> int | None:
    """The pid of the holder serving `directory`, or None: the lock file says whether one runs."""
    try:
        fd = os.open(lock_file(directory), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a holder is alive
            words = os.read(fd, 64).split()
            return int(words[0]) if words else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def stop_holder(directory: Path, timeout: float = 10.0) -> bool:
    """Ask the holder of `directory` to close its connections and exit; True once none runs."""
    pid = holder_pid(directory)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while holder_pid(directory) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
