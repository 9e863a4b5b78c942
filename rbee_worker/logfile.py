"""Size-capped rotating log files for the hive and its workers (one file each under `$RBEE_HOME/logs/`).

`RBEE_LOG_MAX_BYTES` (default 10 MB) caps a file; `RBEE_LOG_BACKUPS` (default 3)
rotated copies (`hive.log.1` …) are kept. A worker's stdout and stderr (tracebacks,
the runtime's own C-level output) go to the same file through the descriptor the
hive opened; after a rotation those land in the rotated copy.
"""

from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler
from pathlib import Path

#: set by the hive for each worker: the file its Python logging writes to
WORKER_LOG_ENV = "RBEE_WORKER_LOG"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def rotating_handler(path: str | os.PathLike[str]) -> RotatingFileHandler:
    max_bytes = int(os.environ.get("RBEE_LOG_MAX_BYTES", 10_000_000))
    backups = int(os.environ.get("RBEE_LOG_BACKUPS", 3))
    handler = RotatingFileHandler(Path(path), maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def log_to(path: str | os.PathLike[str]) -> None:
    """Send this process's logging to `path` (rotating) instead of stderr."""
    root = logging.getLogger()
    root.handlers[:] = [rotating_handler(path)]
    root.setLevel(logging.INFO)
