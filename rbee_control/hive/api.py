"""The hive's HTTP API, served only on its Unix socket (mode 0600: the owner is the auth).

GET  /v1/health              {status, version, api_version, pid, workers}
POST /v1/workers/spawn       {model, backend?, slots?, ctx?, threads?, idle_timeout?, wait?, timeout?}
POST /v1/workers/ready       callback from a worker: {worker_id, state, url, model, backend, error}
GET  /v1/workers/list        {workers: [...]}
POST /v1/workers/{id}/stop   {id, stopped, how}
POST /v1/admin/shutdown      202; the daemon stops every worker, then exits
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from . import API_VERSION, __version__
from .spawn import SpawnRequest
from .supervisor import Supervisor


def error_response(err: RbeeError) -> JSONResponse:
    body = err.body()
    if err.hint:
        body["error"]["hint"] = err.hint
    return JSONResponse(body, status_code=err.status)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise RbeeError(ErrorCode.INVALID_REQUEST, "body must be a JSON object", status=400)
    return body


def _field(
    body: dict[str, Any], key: str, kind: type, default: Any = None, minimum: float | None = None
) -> Any:
    value: Any = body.get(key)
    if value is None:
        return default
    if kind is float and type(value) is int:
        value = float(value)
    wrong_type = type(value) is not kind  # a separate name: narrowing to `kind` would hide `<`
    if wrong_type or (minimum is not None and value < minimum):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"invalid {key!r}: {value!r}",
            status=400,
            details={
                "field": key,
                "expected": kind.__name__ + (f" >= {minimum:g}" if minimum is not None else ""),
            },
        )
    return value


def create_app(supervisor: Supervisor, request_exit: Callable[[], None]) -> Starlette:
    """`request_exit` tells the server to stop; the lifespan then cascades to the workers."""

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "alive",
                "version": __version__,
                "api_version": API_VERSION,
                "pid": os.getpid(),
                "workers": len(supervisor.registry),
            }
        )

    async def spawn_worker(request: Request) -> JSONResponse:
        body = await _json(request)
        model = _field(body, "model", str)
        if not model:
            raise RbeeError(ErrorCode.INVALID_REQUEST, "'model' is required", status=400)
        req = SpawnRequest(
            model=model,
            backend=_field(body, "backend", str, "auto"),
            slots=_field(body, "slots", int, 1, minimum=1),
            ctx=_field(body, "ctx", int, None, minimum=16),
            threads=_field(body, "threads", int, None, minimum=1),
            idle_timeout=_field(body, "idle_timeout", float, None, minimum=0),
        )
        worker = await supervisor.spawn(
            req,
            wait=_field(body, "wait", bool, False),
            timeout=_field(body, "timeout", float, None, minimum=0),
        )
        return JSONResponse(worker.to_json())

    async def worker_ready(request: Request) -> JSONResponse:
        worker = supervisor.on_ready(await _json(request))
        return JSONResponse({"id": worker.id, "state": str(worker.state)})

    async def list_workers(request: Request) -> JSONResponse:
        return JSONResponse({"workers": [w.to_json() for w in supervisor.registry.list()]})

    async def stop_worker(request: Request) -> JSONResponse:
        worker_id = request.path_params["worker_id"]
        how = await supervisor.stop_worker(worker_id, "asked to stop")
        return JSONResponse({"id": worker_id, "stopped": True, "how": how})

    async def shutdown(request: Request) -> JSONResponse:
        return JSONResponse(
            {"status": "shutting down", "workers": len(supervisor.registry)},
            status_code=202,
            background=BackgroundTask(request_exit),
        )

    async def on_rbee_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RbeeError)
        return error_response(exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await supervisor.start()
        try:
            yield
        finally:
            await supervisor.close()

    return Starlette(
        routes=[
            Route("/v1/health", health, methods=["GET"]),
            Route("/v1/workers/spawn", spawn_worker, methods=["POST"]),
            Route("/v1/workers/ready", worker_ready, methods=["POST"]),
            Route("/v1/workers/list", list_workers, methods=["GET"]),
            Route("/v1/workers/{worker_id}/stop", stop_worker, methods=["POST"]),
            Route("/v1/admin/shutdown", shutdown, methods=["POST"]),
        ],
        exception_handlers={RbeeError: on_rbee_error},
        lifespan=lifespan,
    )
