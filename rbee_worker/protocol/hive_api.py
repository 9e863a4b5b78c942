"""The hive's wire formats: its HTTP API on the node's Unix socket and its `--json` results.

GET  /v1/health              `HiveHealth`
POST /v1/workers/spawn       `SpawnRequest` (spawn.py) → `WorkerInfo`
POST /v1/workers/ready       `ReadyReport`, the worker's callback once loaded or failed
GET  /v1/workers/list        `{"workers": [WorkerInfo]}`
POST /v1/workers/{id}/stop   `StopResult`
POST /v1/admin/shutdown      202 `HiveShutdown`

`rbee-hive models list --json` answers `{"models": [ModelInfo]}` and
`rbee-hive daemon --detach --json` a `DaemonInfo`. Requests are parsed strictly
(an unknown field is an error); answers from a peer tolerate fields this side
does not know yet, so a newer hive does not break an older keeper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ErrorCode, RbeeError
from .wire import invalid, opt_bool, opt_int, opt_str, reject_unknown, req_str, require_object

WORKER_STATES = ("loading", "idle", "busy", "draining")
#: set by the keeper on every hive command: a hive of another release refuses with VERSION_MISMATCH
KEEPER_VERSION_ENV = "RBEE_KEEPER_VERSION"
WORKER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_worker_id(worker_id: str) -> str:
    """The one id check, before an id reaches a URL path or a file name (`../admin/shutdown?`)."""
    if not isinstance(worker_id, str) or not WORKER_ID_RE.fullmatch(worker_id):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"invalid worker id {worker_id!r}",
            details={"id": worker_id, "pattern": WORKER_ID_RE.pattern},
            hint="worker ids look like worker-1a2b3c4d: rbee-keeper worker list",
        )
    return worker_id


def _known(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in body.items() if k in names}


def _answer(cls: type, body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RbeeError(
            ErrorCode.INTERNAL_ERROR, f"{what}: expected a JSON object, got {type(body).__name__}"
        )
    return _known(cls, body)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker as its hive knows it; `api_key` is there because only the socket's owner can ask."""

    id: str
    url: str
    model: str
    state: str
    runtime: str | None = None
    backend: str | None = None
    device: int | None = None
    #: offload steps planned (0 on cpu)
    gpu_layers: int | None = None
    vram_bytes: int | None = None
    #: the memory plan's total: what the hive counted this worker for
    planned_bytes: int | None = None
    pid: int | None = None
    port: int | None = None
    slots: int = 1
    slots_busy: int = 0
    api_key: str | None = None
    started_at: float | None = None
    ready_at: float | None = None
    last_activity: float | None = None
    idle_seconds: float = 0.0
    failed_probes: int = 0
    #: a split worker's llama.cpp RPC servers (`host:port`), holding its layers
    rpc_servers: list[str] = field(default_factory=list)
    #: serves embeddings, not generation
    embedding: bool = False

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def public(self) -> dict[str, Any]:
        """Everything but the key: what `--json` output and logs may show."""
        data = self.to_json()
        data.pop("api_key")
        return data

    @classmethod
    def from_json(cls, body: Any) -> WorkerInfo:
        data = _answer(cls, body, "worker")
        for name in ("id", "url", "model", "state"):
            if not isinstance(data.get(name), str):
                raise RbeeError(ErrorCode.INTERNAL_ERROR, f"worker: {name!r} missing in {body!r}"[:300])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One catalogued model file; `chat_template` only when listed with templates."""

    name: str
    ref: str = ""
    path: str = ""
    size: int | None = None
    sha256: str | None = None
    architecture: str | None = None
    tokenizer_model: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    chat_template: str | None = None
    has_chat_template: bool | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    added_at: float | None = None
    #: `models add` only: it was in the catalog already
    cached: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, body: Any) -> ModelInfo:
        data = _answer(cls, body, "model")
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"model: 'name' missing in {body!r}"[:300])
        context = data.get("context_length")
        if not isinstance(context, int) or isinstance(context, bool):
            data["context_length"] = None
        for name in ("chat_template", "bos_token", "eos_token", "sha256"):
            if not isinstance(data.get(name), str) or not data[name]:
                data[name] = None
        return cls(**data)


@dataclass(frozen=True, slots=True)
class HiveHealth:
    status: str
    version: str
    api_version: str
    pid: int
    workers: int = 0

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, body: Any) -> HiveHealth:
        return cls(**_answer(cls, body, "hive health"))


@dataclass(frozen=True, slots=True)
class DaemonInfo:
    """`rbee-hive daemon --detach`: `status` is `started` or `already_running`."""

    status: str
    pid: int | None = None
    version: str | None = None
    api_version: str | None = None
    home: str | None = None
    socket: str | None = None
    log: str | None = None

    @property
    def started(self) -> bool:
        return self.status == "started"

    @classmethod
    def from_json(cls, body: Any) -> DaemonInfo:
        data = _answer(cls, body, "hive daemon")
        if not isinstance(data.get("status"), str):
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"hive daemon: 'status' missing in {body!r}"[:300])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class StopResult:
    id: str
    stopped: bool = True
    how: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stopped": self.stopped, "how": self.how}

    @classmethod
    def from_json(cls, body: Any) -> StopResult:
        return cls(**_answer(cls, body, "worker stop"))


@dataclass(frozen=True, slots=True)
class HiveShutdown:
    """The daemon's answer to `POST /v1/admin/shutdown`: it is stopping this many workers, then itself."""

    status: str = "shutting down"
    workers: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "workers": self.workers}

    @classmethod
    def from_json(cls, body: Any) -> HiveShutdown:
        return cls(**_answer(cls, body, "hive shutdown"))


@dataclass(frozen=True, slots=True)
class ReadyReport:
    """The worker's callback to its hive: loaded (`ready`) or not (`failed`, with the error)."""

    worker_id: str
    state: str
    url: str | None = None
    model: str | None = None
    runtime: str | None = None
    backend: str | None = None
    device: int | None = None
    vram_bytes: int | None = None
    pid: int | None = None
    error: RbeeError | None = field(default=None, compare=False)
    #: it serves `/v1/embeddings` (spawned with `--embedding`), not generation
    embedding: bool = False

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["error"] = self.error.body()["error"] if self.error is not None else None
        return data

    @classmethod
    def from_json(cls, body: Any) -> ReadyReport:
        body = require_object(body)
        reject_unknown(body, {f.name for f in fields(cls)})
        state = req_str(body, "state")
        if state not in ("ready", "failed"):
            raise invalid("state", f"expected ready or failed, got {state!r}")
        error = body.get("error")
        if error is not None and not isinstance(error, dict):
            raise invalid("error", "expected an error object")
        return cls(
            worker_id=req_str(body, "worker_id"),
            state=state,
            url=opt_str(body, "url"),
            model=opt_str(body, "model"),
            runtime=opt_str(body, "runtime"),
            backend=opt_str(body, "backend"),
            device=opt_int(body, "device", 0),
            vram_bytes=opt_int(body, "vram_bytes", 0),
            pid=opt_int(body, "pid", 1),
            error=RbeeError.from_body({"error": error}) if error is not None else None,
            embedding=opt_bool(body, "embedding"),
        )
