"""Workers this keeper has used, so a warm `infer` goes straight to HTTP.

An open SSH connection costs ~0.1–0.2 s before the first byte; a known worker
answers `/v1/ready` in a millisecond. Entries hold API keys, so the file is 0600,
and any entry that fails its readiness check is forgotten.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rbee_control.inventory.atomic import atomic_write
from rbee_control.inventory.paths import config_dir

FILE_NAME = "known_workers.json"


@dataclass(frozen=True, slots=True)
class KnownWorker:
    node: str
    model: str
    id: str
    url: str
    api_key: str
    runtime: str | None = None
    chat_template: str | None = None
    #: the node's worker certificate (PEM) for an https URL, read over the pinned SSH channel
    tls_certificate: str | None = None


class KnownWorkers:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / FILE_NAME

    def _read(self) -> list[KnownWorker]:
        with contextlib.suppress(OSError, ValueError, TypeError):
            raw = json.loads(self.path.read_text())
            names = set(KnownWorker.__dataclass_fields__)
            return [KnownWorker(**{k: v for k, v in e.items() if k in names}) for e in raw.get("workers", [])]
        return []

    def _write(self, workers: list[KnownWorker]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"workers": [asdict(w) for w in workers]}, indent=2).encode()
        atomic_write(self.path, data, mode=0o600)

    def find(self, node: str, model: str) -> list[KnownWorker]:
        return [w for w in self._read() if w.node == node and w.model == model]

    def remember(self, worker: KnownWorker) -> None:
        others = [w for w in self._read() if w.id != worker.id or w.node != worker.node]
        self._write([*others, worker])

    def forget(self, node: str, worker_id: str | None = None) -> None:
        kept = [w for w in self._read() if not (w.node == node and worker_id in (None, w.id))]
        self._write(kept)
