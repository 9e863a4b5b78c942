"""What a worker is and knows: its configuration, phase, slots and running requests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from ..chat import ChatRenderer
from ..gguf_info import GGUFInfo
from ..planning import GpuLayers
from ..protocol.errors import ErrorCode, RbeeError
from .generation import Generation
from .metrics import WorkerMetrics
from .slots import RETRY_AFTER_SECONDS, SlotPool

if TYPE_CHECKING:
    from ..runtimes.llama_embedding import LlamaEmbeddingRuntime

#: Seconds between SSE comments while a request waits for a slot (`--sse-keepalive`).
DEFAULT_KEEPALIVE_S = 10.0


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model_path: str
    api_key: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 8081
    #: the GGUF runtime: auto | ctransformers | llama-cpp
    runtime: str = "auto"
    #: where it runs: auto | cpu | cuda | metal
    backend: str = "auto"
    device: int | None = None
    gpu_layers: GpuLayers = "auto"
    slots: int = 1
    queue: int = 8
    ctx: int | None = None
    threads: int | None = None
    worker_id: str = "worker"
    callback_url: str | None = None
    callback_uds: str | None = None
    failed_linger_s: float = 5.0
    #: HTTPS when both are given (the hive's certificate, for an address beyond loopback)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    request_timeout_s: float = 300.0
    #: Seconds a client has to send a request head; then the connection is closed (slow clients).
    head_timeout_s: float = 10.0
    max_connections: int = 1024
    #: llama.cpp RPC servers (`host:port`) that hold layers of this model: a split worker
    rpc_servers: tuple[str, ...] = ()
    #: weights per device for the layers (llama.cpp's --tensor-split); empty = by free memory
    tensor_split: tuple[float, ...] = ()
    #: KV cache type (llama.cpp's -ctk/-ctv)
    cache_type: str = "f16"
    #: serve `/v1/embeddings` (a pooling context) instead of generation
    embedding: bool = False
    #: embedding pooling: auto (the model's own, else mean) | mean | cls | last
    pooling: str = "auto"
    keepalive_s: float = DEFAULT_KEEPALIVE_S


@dataclass(eq=False)
class WorkerState:
    config: WorkerConfig
    phase: Phase = Phase.LOADING
    progress: float = 0.0
    error: RbeeError | None = None
    info: GGUFInfo | None = None
    runtime: str | None = None
    backend: str | None = None
    device: int | None = None
    gpu_layers: int = 0
    vram_bytes: int = 0
    chat: ChatRenderer | None = None
    embedder: LlamaEmbeddingRuntime | None = None
    started_at: float = field(default_factory=time.time)
    pool: SlotPool = field(init=False)
    generations: dict[str, Generation] = field(default_factory=dict)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.pool = SlotPool(queue_limit=self.config.queue)

    @property
    def model_name(self) -> str:
        return self.info.name if self.info else self.config.model_path

    @property
    def url(self) -> str:
        scheme = "https" if self.config.ssl_certfile else "http"
        return f"{scheme}://{self.config.host}:{self.config.port}"

    def set_phase(self, phase: Phase, error: RbeeError | None = None) -> None:
        self.phase, self.error = phase, error
        self.metrics.set_state(phase.value)
        self._notify()

    def set_progress(self, fraction: float) -> None:
        self.progress = max(self.progress, min(1.0, fraction))
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def ready_body(self) -> dict[str, object]:
        body: dict[str, object] = {
            "state": self.phase.value,
            "progress": round(self.progress, 3),
            "worker_id": self.config.worker_id,
            "model": self.model_name,
            "runtime": self.runtime,
            "backend": self.backend,
            "device": self.device,
            "gpu_layers": self.gpu_layers,
            "vram_bytes": self.vram_bytes,
            "slots": self.config.slots,
            "slots_busy": self.pool.busy,
            "cache_type": self.config.cache_type,
        }
        if self.chat is not None:
            body.update(self.chat.ready_fields())
        body["embedding"] = self.config.embedding
        if self.embedder is not None:
            body["dimensions"] = self.embedder.dimensions
            body["pooling"] = self.embedder.pooling
        if self.error is not None:
            body["error"] = self.error.body()["error"]
        return body


def check_serving(state: WorkerState) -> None:
    """Refuse work unless loaded: 503 while loading (with progress), draining, or after a failed load."""
    if state.phase is Phase.READY:
        return
    if state.phase is Phase.LOADING:
        raise RbeeError(
            ErrorCode.MODEL_LOADING,
            "model is still loading",
            status=503,
            details={"progress": state.progress, "retry_after": RETRY_AFTER_SECONDS},
        )
    if state.phase is Phase.DRAINING:
        raise RbeeError(ErrorCode.WORKER_DRAINING, "worker is shutting down", status=503)
    raise RbeeError(
        ErrorCode.MODEL_LOAD_FAILED,
        state.error.message if state.error else "model failed to load",
        status=503,
    )
