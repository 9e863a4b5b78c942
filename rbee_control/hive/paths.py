"""Where a hive keeps its state under `$RBEE_HOME`, and what names may go there.

Several "nodes" can share one machine (each with its own home), so every file the
hive touches is derived from one `HivePaths`, never from a global default.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import WORKER_ID_RE as WORKER_ID_RE  # re-exported: one id rule
from rbee_worker.protocol.hive_api import check_worker_id

DEFAULT_HOME = "~/.local/share/rbee"
MODELS_DIR_ENV = "RBEE_MODELS_DIR"
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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


@dataclass(frozen=True, slots=True)
class HivePaths:
    home: Path
    #: the inventory's `models_dir` for this node; None keeps models in `<home>/models`
    models_override: Path | None = None

    @classmethod
    def resolve(
        cls, home: str | os.PathLike[str] | None = None, models_dir: str | os.PathLike[str] | None = None
    ) -> HivePaths:
        """`models_dir`, else `$RBEE_MODELS_DIR`, else `<home>/models`."""
        raw = models_dir or os.environ.get(MODELS_DIR_ENV)
        override = Path(os.path.expanduser(str(raw))).resolve() if raw else None
        return cls(resolve_home(home), override)

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
        return self.models_override or self.home / "models"

    @property
    def incoming_dir(self) -> Path:
        """Where the keeper pushes `file:` models over SFTP; `models add` moves them out."""
        return self.home / "incoming"

    @property
    def tls_dir(self) -> Path:
        """The hive's self-signed certificate and its key (0600), for workers beyond loopback."""
        return self.home / "tls"

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

    def split_file(self, name: str, index: int, count: int) -> Path:
        """Part `index` of `count` of a split model, named the way llama.cpp looks for its siblings."""
        return self.models_dir / f"{check_model_name(name)}-{index:05d}-of-{count:05d}.gguf"

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
        """Create the home (0700: it holds worker keys) and its subdirectories.

        An existing home made with a looser mode (an old version, a hand-made
        directory) is tightened too: `mkdir` leaves existing modes alone.
        """
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.models_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in (self.logs_dir, self.workers_dir):
            sub.mkdir(exist_ok=True, mode=0o700)
        for path in (self.home, self.models_dir, self.logs_dir, self.workers_dir):
            _private(path, 0o700)
        return self


def _private(path: Path, mode: int) -> None:
    """chmod `path` to `mode` when group or others have any access to it."""
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, mode)
