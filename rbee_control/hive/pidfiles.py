"""What the hive writes to disk about processes: `hive.pid` and `workers/<id>.json`.

These files are how a new hive (or `rbee-hive stop` with no daemon left) finds
what an earlier one started. Worker files hold the worker's API key, so they are
written 0600, atomically, and never contain anything the file name does not own.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from rbee_worker.protocol.spawn import RUNTIMES

from .paths import HivePaths
from .process import is_alive


def write_private(path: Path, text: str) -> None:
    """Write-then-rename with mode 0600 from the first byte (no window where others can read)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# --- the hive daemon ---------------------------------------------------------


def _is_hive(pid: int) -> bool:
    try:
        cmd = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return "daemon" in cmd and ("rbee-hive" in cmd or "rbee_control.hive" in cmd)


def running_hive(paths: HivePaths) -> int | None:
    """The pid of this home's live daemon; a stale pid file (dead or reused pid) is removed."""
    try:
        pid = int(paths.pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid != os.getpid() and is_alive(pid) and _is_hive(pid):
        return pid
    with contextlib.suppress(OSError):
        paths.pid_file.unlink()
    return None


def claim_hive_pid(paths: HivePaths) -> int | None:
    """Write our pid unless a live daemon holds the file; return that daemon's pid if so."""
    for _ in range(3):
        other = running_hive(paths)
        if other is not None:
            return other
        try:
            fd = os.open(paths.pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # another daemon won the race (or a stale file): look again
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return None
    return running_hive(paths)


def release_hive_pid(paths: HivePaths) -> None:
    try:
        if int(paths.pid_file.read_text().split()[0]) == os.getpid():
            paths.pid_file.unlink()
    except (OSError, ValueError, IndexError):
        pass


# --- workers -----------------------------------------------------------------


@dataclass(slots=True)
class WorkerFile:
    id: str
    pid: int
    create_time: float | None
    port: int
    url: str
    model: str
    model_path: str
    #: where it runs: cpu | cuda | metal
    backend: str
    api_key: str = field(repr=False)  # a record may be logged; its key must not be
    slots: int
    started_at: float
    #: the GGUF runtime (llama-cpp | ctransformers)
    runtime: str = ""
    device: int | None = None
    #: offload steps planned (0 on cpu; n_layers + 1 is everything)
    gpu_layers: int = 0
    #: the memory plan's total: what the hive counted this worker for
    planned_bytes: int = 0
    #: what the worker reported it holds on its GPU
    vram_bytes: int = 0
    #: a split worker's RPC servers (`host:port`)
    rpc_servers: list[str] = field(default_factory=list)
    #: serves embeddings (`--embedding`), not generation
    embedding: bool = False

    def save(self, paths: HivePaths) -> None:
        write_private(paths.worker_file(self.id), json.dumps(asdict(self), indent=1))

    def remove(self, paths: HivePaths) -> None:
        paths.worker_file(self.id).unlink(missing_ok=True)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_worker_files(paths: HivePaths) -> list[WorkerFile]:
    """Every readable worker record; unreadable ones are skipped (and reported by the caller's log)."""
    found = []
    for path in sorted(paths.workers_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if "runtime" not in data and data.get("backend") in RUNTIMES:  # written by rbee 0.1.0
                data["runtime"], data["backend"] = data["backend"], "cpu"
            found.append(WorkerFile(**{k: data[k] for k in WorkerFile.__dataclass_fields__ if k in data}))
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
    return found
