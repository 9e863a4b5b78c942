"""The queen's native API: registering a worker and listing the routing table (`/v2/workers/*`).

POST   /v2/workers/register   `WorkerRegistration` → 201 `QueenWorker`
GET    /v2/workers/list       `{"workers": [QueenWorker]}`
DELETE /v2/workers/{id}       `{"id", "removed"}`

Registration takes rbee's field names and the seeds' (`worker_id`, `model_ref`,
`node_name`, `slots_total`) for the same things, plus the seeds' `backend`,
`device` and `vram_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from .wire import invalid, opt_int, opt_str, reject_unknown, require_object

_ALIASES = {"worker_id": "id", "model_ref": "model", "node_name": "node", "slots_total": "slots"}


@dataclass(frozen=True, slots=True)
class WorkerRegistration:
    url: str
    api_key: str
    id: str | None = None
    model: str | None = None
    node: str | None = None
    runtime: str | None = None
    backend: str | None = None
    device: int | None = None
    vram_bytes: int | None = None
    slots: int | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    context_length: int | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, body: Any) -> WorkerRegistration:
        body = dict(require_object(body))
        for alias, name in _ALIASES.items():
            if alias in body:
                if name in body:
                    raise invalid(alias, f"give {alias} or {name}, not both")
                body[name] = body.pop(alias)
        reject_unknown(body, {f.name for f in fields(cls)})
        url = opt_str(body, "url")
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid("url", "expected an http(s) URL such as http://10.0.0.5:8081")
        api_key = opt_str(body, "api_key")
        if api_key is None:
            raise invalid("api_key", "required: the queen calls the worker with it")
        return cls(
            url=f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}",
            api_key=api_key,
            id=opt_str(body, "id"),
            model=opt_str(body, "model"),
            node=opt_str(body, "node"),
            runtime=opt_str(body, "runtime"),
            backend=opt_str(body, "backend"),
            device=opt_int(body, "device", 0),
            vram_bytes=opt_int(body, "vram_bytes", 0),
            slots=opt_int(body, "slots", 1),
            chat_template=opt_str(body, "chat_template"),
            bos_token=opt_str(body, "bos_token"),
            eos_token=opt_str(body, "eos_token"),
            context_length=opt_int(body, "context_length"),
        )


@dataclass(frozen=True, slots=True)
class QueenWorker:
    """A routed worker as `/v2/workers/list` shows it: everything but its key."""

    id: str
    node: str
    model: str
    url: str
    slots: int
    in_flight: int
    served: int
    owned: bool
    failures: int
    added_at: float
    backend: str | None = None
    device: int | None = None
    vram_bytes: int | None = None
    embedding: bool = False

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, body: Any) -> QueenWorker:
        data = require_object(body, "worker")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
