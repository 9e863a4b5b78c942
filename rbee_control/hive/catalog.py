"""The node's model catalog: one SQLite row per model file that is whole and valid.

A row is only ever written after the file has been downloaded, verified, parsed
as GGUF and renamed into place, so "in the catalog" means "ready to load". The CLI
(`rbee-hive models ...`) and the daemon open the same file from different
processes; WAL mode plus `BEGIN IMMEDIATE` for writes keeps that safe.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rbee_worker.protocol.errors import ErrorCode, RbeeError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    ref TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    architecture TEXT NOT NULL,
    tokenizer_model TEXT,
    quantization TEXT,
    context_length INTEGER,
    chat_template TEXT,
    added_at REAL NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class ModelRow:
    name: str
    ref: str
    path: str
    size: int
    sha256: str
    architecture: str
    tokenizer_model: str | None
    quantization: str | None
    context_length: int | None
    chat_template: str | None
    added_at: float

    def to_json(self, with_template: bool = False) -> dict[str, Any]:
        """The wire form; the chat template (often kilobytes) only when asked for."""
        data = asdict(self)
        if not with_template:
            data.pop("chat_template")
            data["has_chat_template"] = self.chat_template is not None
        return data


_COLUMNS = list(ModelRow.__dataclass_fields__)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM models"
_INSERT = f"INSERT INTO models ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


class Catalog:
    """Short-lived connections per call: the CLI and the daemon must never hold a lock for long."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # 0600 before SQLite opens it (its -wal and -shm files copy the mode): rows name every model file
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if file.exists() and stat.S_IMODE(file.stat().st_mode) & 0o077:
                os.chmod(file, 0o600)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            yield db
        except sqlite3.OperationalError as exc:
            raise RbeeError(
                ErrorCode.INTERNAL_ERROR,
                f"model catalog {self.path}: {exc}",
                details={"path": str(self.path)},
            ) from exc
        finally:
            db.close()

    def get(self, name: str) -> ModelRow | None:
        with self._connect() as db:
            row = db.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
        return ModelRow(*row) if row else None

    def require(self, name: str) -> ModelRow:
        row = self.get(name)
        if row is None:
            raise RbeeError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {name!r} is not in this node's catalog",
                details={"name": name},
                hint=f"add it first: rbee-keeper models add REF --name {shlex.quote(name)} --node NODE",
            )
        return row

    def list(self) -> list[ModelRow]:
        with self._connect() as db:
            rows = db.execute(f"{_SELECT} ORDER BY name").fetchall()
        return [ModelRow(*r) for r in rows]

    def add(self, row: ModelRow) -> ModelRow:
        """Insert a row; if another process catalogued the same name meanwhile, keep theirs."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                existing = db.execute(f"{_SELECT} WHERE name = ?", (row.name,)).fetchone()
                if existing is None:
                    db.execute(_INSERT, _values(row))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return ModelRow(*existing) if existing else row

    def remove(self, name: str) -> ModelRow | None:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
                db.execute("DELETE FROM models WHERE name = ?", (name,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return ModelRow(*row) if row else None


def _values(row: ModelRow) -> tuple[Any, ...]:
    return tuple(getattr(row, c) for c in _COLUMNS)
