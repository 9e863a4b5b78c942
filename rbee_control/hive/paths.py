"""Where a hive keeps its state under `$RBEE_HOME`, and what names may go there.

Several "nodes" can share one machine (each with its own home), so every file the
hive touches is derived from one `HivePaths`, never from a global default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rbee_worker.protocol.errors import ErrorCode, RbeeError

DEFAULT_HOME = "~/.local/share/rbee"
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
WORKER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """`--home`, else `$RBEE_HOME`, else `~/.local/share/rbee` — made absolute."""
    raw = home or os.environ.get("RBEE_HOME") or DEFAULT_HOME
    return Path(os.path.expanduser(str(raw))).resolve()


def check_model_name(name: str) -> str:
    """Refuse names that could escape the models directory or confuse a shell."""
    if not MODEL_NAME_RE.fullmatch(name) or name.endswith((".part", ".lock")):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"invalid model name {name!r}",
            details={"name": name, "pattern": MODEL_NAME_RE.pattern},
            hint="use letters, digits, '.', '_' and '-' (at most 128), e.g. --name tinyllama-q4",
        )
    return name


def check_worker_id(worker_id: str) -> str:
    if not WORKER_ID_RE.fullmatch(worker_id):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"invalid worker id {worker_id!r}",
            details={"id": worker_id},
        )
    return worker_id


@dataclass(frozen=True, slots=True)
class HivePaths:
    home: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> HivePaths:
        return cls(resolve_home(home))

    @property
    def pid_file(self) -> Path:
        return self.home / "hive.pid"

    @property
    def socket(self) -> Path:
        return self.home / "hive.sock"

    @property
    def db(self) -> Path:
        return self.home / "models.db"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def workers_dir(self) -> Path:
        return self.home / "workers"

    @property
    def hive_log(self) -> Path:
        return self.logs_dir / "hive.log"

    def model_file(self, name: str) -> Path:
        return self.models_dir / f"{check_model_name(name)}.gguf"

    def model_part(self, name: str) -> Path:
        return self.models_dir / f"{check_model_name(name)}.gguf.part"

    def model_lock(self, name: str) -> Path:
        return self.models_dir / f".{check_model_name(name)}.lock"

    def worker_file(self, worker_id: str) -> Path:
        return self.workers_dir / f"{check_worker_id(worker_id)}.json"

    def worker_log(self, worker_id: str) -> Path:
        """`logs/worker-<hex>.log`: worker ids already start with `worker-`."""
        return self.logs_dir / f"{check_worker_id(worker_id)}.log"

    def ensure(self) -> HivePaths:
        """Create the home (0700: it holds worker keys) and its subdirectories."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in (self.models_dir, self.logs_dir, self.workers_dir):
            sub.mkdir(exist_ok=True, mode=0o700)
        return self
