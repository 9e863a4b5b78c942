"""Assemble the worker's ASGI app and run it: bind first, then load, then report."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..chat import chat_renderer
from ..gguf_info import GGUFInfo, read_gguf_info
from ..model_shape import read_model_shape
from ..planning import check_cache_type
from ..protocol.errors import ErrorCode, RbeeError
from ..protocol.hive_api import ReadyReport
from ..protocol.spawn import DEFAULT_CACHE_TYPE
from ..runtimes import LLAMA_CPP, choose_backend, device_choice, runtime_factory
from . import event_loop
from .connections import ConnectionLimits, guarded_protocol
from .middleware import BearerAuthMiddleware, HeadersTimeoutMiddleware, RequestIdMiddleware
from .routes import PUBLIC_PATHS, ROUTES
from .state import Phase, WorkerConfig, WorkerState

if TYPE_CHECKING:
    from ..runtimes import Runtime
    from ..runtimes.llama_cpp_runtime import LlamaCppRuntime

log = logging.getLogger("rbee.worker")

#: Upper bound of the default context per sequence (--ctx-size overrides it).
DEFAULT_CONTEXT = 4096
#: every layer on the devices (llama.cpp's own "all"), as `llama-server --rpc -ngl 99` does
_ALL_LAYERS = 999

#: Seconds an idle keep-alive connection stays open (uvicorn's default is 5).
KEEP_ALIVE_S = 75


async def _rbee_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RbeeError)
    headers = {"Retry-After": str(exc.details["retry_after"])} if "retry_after" in exc.details else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status_code", 404)
    code = ErrorCode.NOT_FOUND if status == 404 else ErrorCode.INVALID_REQUEST
    return JSONResponse(RbeeError(code, f"{request.method} {request.url.path}: {exc}").body(), status)


def create_app(config: WorkerConfig, *, load: bool = True) -> Starlette:
    """The worker app; with `load`, its lifespan loads the model in the background."""
    state_box: dict[str, WorkerState] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = WorkerState(config)
        state_box["state"] = state
        app.state.worker = state
        app.state.drain = lambda: _drain(app)
        app.state.exit_code = 0
        task = asyncio.create_task(load_model(app)) if load else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            for generation in list(state.generations.values()):
                generation.cancel()

    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={RbeeError: _rbee_error, 404: _not_found, 405: _not_found},
        middleware=[
            Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]),
            Middleware(RequestIdMiddleware),
            Middleware(BearerAuthMiddleware, api_key=config.api_key, public_paths=PUBLIC_PATHS),
            Middleware(HeadersTimeoutMiddleware, seconds=config.request_timeout_s),
        ],
    )


async def load_model(app: Starlette) -> None:
    state: WorkerState = app.state.worker
    config = state.config
    loop = asyncio.get_running_loop()
    try:
        info = await asyncio.to_thread(read_gguf_info, config.model_path)
        state.info = info
        backend = choose_backend(info, device_choice.runtime_for(config.runtime, config.backend))
        state.runtime = backend
        ctx = config.ctx or default_context(info.context_length)
        threads = config.threads or default_threads()
        where = await asyncio.to_thread(
            device_choice.for_worker,
            config.backend,
            config.device,
            config.gpu_layers,
            runtime=backend,
            model_path=config.model_path,
            slots=config.slots,
            ctx=ctx,
        )
        offload: dict[str, Any] = {"gpu_layers": where.n_gpu_layers, "main_gpu": where.main_gpu}
        if config.rpc_servers:
            offload.update(await asyncio.to_thread(split_offload, config, backend))
        state.backend, state.device, state.gpu_layers = where.backend, where.device, offload["gpu_layers"]
        if config.embedding:
            await _load_embedder(state, backend, ctx, threads, loop, offload)
        else:
            await _load_slots(state, info, backend, ctx, threads, loop, offload)
        state.vram_bytes = await asyncio.to_thread(device_choice.vram_used, where)
        state.metrics.slots_total.set(config.slots)
        state.set_progress(1.0)
        state.set_phase(Phase.READY)
        log.info(
            "ready: %s on %s with %s on %s, %d layers offloaded, %d MB VRAM, %d slot(s), "
            "%d-token context each%s",
            info.name, state.url, backend, where.backend, state.gpu_layers, state.vram_bytes >> 20,
            config.slots, ctx, ", embeddings" if config.embedding else "",
        )  # fmt: skip
    except RbeeError as exc:
        state.set_phase(Phase.FAILED, exc)
        app.state.exit_code = 1
        log.error("failed: %s", exc.message)
    await _report(state)
    if state.phase is Phase.FAILED:
        await asyncio.sleep(config.failed_linger_s)
        app.state.server.should_exit = True


def split_offload(config: WorkerConfig, runtime: str) -> dict[str, Any]:
    """A split worker's load options, once every RPC server answered with a version we speak.

    llama.cpp aborts the process on an unreachable or mismatched server, so both are
    checked here first, where they are ordinary errors the hive hears about.
    """
    from ..protocol.rpc import check_versions, hello
    from ..runtimes.rpc_devices import client_version

    if runtime != LLAMA_CPP:
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            f"a split over RPC servers needs the llama-cpp runtime, not {runtime}",
            status=422,
        )
    client = client_version()
    for endpoint in config.rpc_servers:
        server = hello(endpoint)
        if client is not None:
            check_versions(endpoint, server, client)
    layers = config.gpu_layers if isinstance(config.gpu_layers, int) else _ALL_LAYERS
    return {"gpu_layers": layers, "rpc_servers": config.rpc_servers, "tensor_split": config.tensor_split}


async def _load_slots(
    state: WorkerState,
    info: GGUFInfo,
    backend: str,
    ctx: int,
    threads: int,
    loop: asyncio.AbstractEventLoop,
    offload: dict[str, Any],
) -> None:
    """llama-cpp: one model, one KV sequence per slot. ctransformers cannot batch: one copy per slot."""
    config = state.config
    factory = runtime_factory(backend)
    copies = 1 if backend == LLAMA_CPP else config.slots
    options: dict[str, Any] = {}
    quantized_cache = config.cache_type != DEFAULT_CACHE_TYPE
    if backend == LLAMA_CPP:
        options = {"sequences": config.slots, "cache_type": config.cache_type, **offload}
        if quantized_cache:  # llama.cpp's own refusal names only the context size
            check_cache_type(await asyncio.to_thread(read_model_shape, config.model_path), config.cache_type)
    elif quantized_cache:
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE, f"{backend} has no KV cache types; use llama-cpp", status=422
        )
    for index in range(copies):

        def progress(fraction: float, index: int = index) -> None:
            loop.call_soon_threadsafe(state.set_progress, (index + fraction) / copies)

        try:
            runtime = await asyncio.to_thread(
                factory, config.model_path, context_length=ctx, threads=threads, progress=progress, **options
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise RbeeError(
                ErrorCode.MODEL_LOAD_FAILED, f"{backend} could not load {config.model_path}: {exc}"
            ) from None
        if index == 0:
            state.chat = await chat_renderer(info, runtime)
        if backend == LLAMA_CPP:
            shared = cast("LlamaCppRuntime", runtime)
            state.pool.own(shared)
            for seat in range(config.slots):
                state.pool.add(shared.seat(seat))
        else:
            state.pool.add(runtime)


async def _load_embedder(
    state: WorkerState,
    backend: str,
    ctx: int,
    threads: int,
    loop: asyncio.AbstractEventLoop,
    offload: dict[str, Any],
) -> None:
    """`--embedding`: one pooling context, no generation engine; `slots` only bound concurrency."""
    config = state.config
    if backend != LLAMA_CPP:
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            f"{backend} cannot compute embeddings; use --runtime llama-cpp",
            status=422,
            details={"backend": backend, "field": "runtime"},
        )
    from ..runtimes.llama_embedding import LlamaEmbeddingRuntime

    def progress(fraction: float) -> None:
        loop.call_soon_threadsafe(state.set_progress, fraction)

    try:
        runtime = await asyncio.to_thread(
            LlamaEmbeddingRuntime, config.model_path, context_length=ctx, threads=threads,
            progress=progress, pooling=config.pooling, **offload,
        )  # fmt: skip
    except (RuntimeError, ValueError, OSError) as exc:
        raise RbeeError(
            ErrorCode.MODEL_LOAD_FAILED, f"{backend} could not load {config.model_path} for embeddings: {exc}"
        ) from None
    state.embedder = runtime
    state.pool.own(cast("Runtime", runtime))
    for _ in range(config.slots):
        # Admission only: an embedding worker never hands a slot's runtime to a generation.
        state.pool.add(cast("Runtime", runtime))


async def _report(state: WorkerState) -> None:
    """Tell the hive (or whoever spawned us) the outcome of loading; never fatal."""
    config = state.config
    if not config.callback_url:
        return
    body = ReadyReport(
        worker_id=config.worker_id,
        state=state.phase.value,
        url=state.url,
        model=state.model_name,
        runtime=state.runtime,
        backend=state.backend,
        device=state.device,
        vram_bytes=state.vram_bytes,
        pid=os.getpid(),
        error=state.error,
        embedding=state.config.embedding,
    ).to_json()
    transport = httpx.AsyncHTTPTransport(uds=config.callback_uds) if config.callback_uds else None
    try:
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            await client.post(config.callback_url, json=body)
    except httpx.HTTPError as exc:
        log.warning("ready callback to %s failed: %s", config.callback_url, exc)


def _drain(app: Starlette) -> None:
    """Refuse new work, let running requests finish, then exit."""
    state: WorkerState = app.state.worker
    if state.phase is Phase.DRAINING:
        return
    state.set_phase(Phase.DRAINING)

    async def wait_then_exit() -> None:
        while state.pool.active:
            await asyncio.sleep(0.05)
        app.state.server.should_exit = True

    app.state.drain_task = asyncio.create_task(wait_then_exit())


def default_context(training_context: int | None) -> int:
    """Tokens per sequence unless --ctx-size says otherwise: the model's own, at most 4096.

    A training context of 32k or 128k would reserve gigabytes of KV cache per slot
    for prompts that are almost always far shorter.
    """
    return min(training_context or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


def default_threads() -> int:
    """Half the cores: ggml's spinning threads collapse when they outnumber idle cores."""
    return max(1, (os.cpu_count() or 2) // 2)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading, so a taken port fails fast and callers can connect at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when
    # sock.proto says TCP, and without it small JSON replies wait ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RbeeError(
            ErrorCode.NO_PORT_AVAILABLE, f"cannot bind {host}:{port}: {exc.strerror}", details={"port": port}
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class WorkerServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains (running requests finish, exit 0); a second one forces."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app
        self._signalled = False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.config.is_ssl:
            await super().shutdown(sockets)
            return
        reaper = asyncio.ensure_future(self._abort_finished_tls())
        try:
            await super().shutdown(sockets)
        finally:
            reaper.cancel()

    async def _abort_finished_tls(self) -> None:
        """A TLS close waits (30 s) for the peer's close_notify, which an idle keep-alive client never
        sends: a connection with no response running and nothing left to send is aborted instead."""
        while True:
            for conn in list(self.server_state.connections):
                cycle, transport = getattr(conn, "cycle", None), getattr(conn, "transport", None)
                idle = cycle is None or cycle.response_complete
                if transport is not None and idle and not transport.get_write_buffer_size():
                    transport.abort()
            await asyncio.sleep(0.05)

    def handle_exit(self, sig: int, frame: object) -> None:
        if self._signalled or getattr(self._app.state, "worker", None) is None:
            self.should_exit = True
            self.force_exit = self._signalled
            return
        self._signalled = True
        asyncio.get_event_loop().call_soon_threadsafe(self._app.state.drain)


def serve(config: WorkerConfig) -> int:
    """Run until shut down; return the process exit code."""
    sock = bind_socket(config.host, config.port)
    if config.port == 0:
        config = dataclasses.replace(config, port=sock.getsockname()[1])
    app = create_app(config)
    limits = ConnectionLimits(head_timeout=config.head_timeout_s, max_connections=config.max_connections)
    server = WorkerServer(
        uvicorn.Config(
            app,
            http=guarded_protocol(limits),
            limit_concurrency=limits.uvicorn_concurrency,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=30,
            # Longer than any client's idle keep-alive (the queen keeps 30 s): the client closes an
            # idle connection first, so a request never races the worker's close and fails.
            timeout_keep_alive=KEEP_ALIVE_S,
            lifespan="on",
            ssl_certfile=config.ssl_certfile,
            ssl_keyfile=config.ssl_keyfile,
        ),
        app,
    )
    app.state.server = server
    app.state.exit_code = 0
    event_loop.run(server.serve(sockets=[sock]))
    code = app.state.exit_code
    if code and getattr(app.state, "worker", None) is not None and app.state.worker.error is not None:
        print(f"rbee-worker: {app.state.worker.error.message}", file=sys.stderr)
    return code
