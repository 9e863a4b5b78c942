"""The hive's HTTP API, served only on its Unix socket (mode 0600: the owner is the auth).

GET  /v1/health              HiveHealth
GET  /v1/status              what `rbee-hive status` prints for a running hive (one round trip)
GET  /v1/models              {models: [ModelInfo]} from the catalog; `?templates=1` adds chat templates
POST /v1/workers/spawn       SpawnRequest → WorkerInfo
POST /v1/workers/ready       ReadyReport, the callback of a worker once loaded or failed
GET  /v1/workers/list        {workers: [WorkerInfo]}
POST /v1/workers/{id}/stop   StopResult
POST /v1/rpc/start           {threads?} → RpcServerInfo: a ggml-rpc-server for a split worker elsewhere
GET  /v1/rpc/list            {servers: [RpcServerInfo]}
POST /v1/rpc/{id}/stop       StopResult
POST /v1/admin/shutdown      202; the daemon stops every worker, then exits

The bodies are defined in `rbee_worker.protocol.hive_api` and `.spawn`, and parsed
there once; the handlers below see typed objects only.
"""

from __future__ import annotations

import asyncio
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
from rbee_worker.protocol.hive_api import HiveHealth, HiveShutdown, ReadyReport, StopResult
from rbee_worker.protocol.rpc import parse_start_body
from rbee_worker.protocol.spawn import SpawnRequest

from . import API_VERSION, __version__
from .models import list_models
from .paths import check_worker_id
from .status import running_status
from .supervisor import Supervisor


def error_response(err: RbeeError) -> JSONResponse:
    body = err.body()
    if err.hint:
        body["error"]["hint"] = err.hint
    return JSONResponse(body, status_code=err.status)


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "body must be a JSON object") from None


def create_app(supervisor: Supervisor, request_exit: Callable[[], None]) -> Starlette:
    """`request_exit` tells the server to stop; the lifespan then cascades to the workers."""

    async def health(request: Request) -> JSONResponse:
        health = HiveHealth("alive", __version__, API_VERSION, os.getpid(), len(supervisor.registry))
        return JSONResponse(health.to_json())

    async def status(request: Request) -> JSONResponse:
        workers = [w.info().to_json() for w in supervisor.registry.list()]
        rpc = [r.info().to_json() for r in supervisor.rpc.list()]
        # node facts read /proc, the catalog and maybe nvidia-smi: off the event loop
        info = await asyncio.to_thread(running_status, supervisor.paths, os.getpid(), workers, rpc)
        return JSONResponse(info)

    async def models(request: Request) -> JSONResponse:
        templates = request.query_params.get("templates") in ("1", "true")
        rows = await asyncio.to_thread(list_models, supervisor.paths)
        return JSONResponse({"models": [r.to_json(with_template=templates) for r in rows]})

    async def spawn_worker(request: Request) -> JSONResponse:
        worker = await supervisor.spawn(SpawnRequest.from_json(await _json(request)))
        return JSONResponse(worker.info().to_json())

    async def worker_ready(request: Request) -> JSONResponse:
        worker = supervisor.on_ready(ReadyReport.from_json(await _json(request)))
        return JSONResponse({"id": worker.id, "state": str(worker.state)})

    async def list_workers(request: Request) -> JSONResponse:
        return JSONResponse({"workers": [w.info().to_json() for w in supervisor.registry.list()]})

    async def stop_worker(request: Request) -> JSONResponse:
        worker_id = check_worker_id(request.path_params["worker_id"])
        how = await supervisor.stop_worker(worker_id, "asked to stop")
        return JSONResponse(StopResult(worker_id, True, how).to_json())

    async def rpc_start(request: Request) -> JSONResponse:
        threads = parse_start_body(await _json(request))
        record = await supervisor.rpc_start(threads)
        return JSONResponse(record.info().to_json())

    async def rpc_list(request: Request) -> JSONResponse:
        return JSONResponse({"servers": [r.info().to_json() for r in supervisor.rpc.list()]})

    async def rpc_stop(request: Request) -> JSONResponse:
        record = supervisor.rpc.require(request.path_params["rpc_id"])
        how = await supervisor.rpc.stop(record.id, "asked to stop")
        return JSONResponse(StopResult(record.id, True, how).to_json())

    async def shutdown(request: Request) -> JSONResponse:
        return JSONResponse(
            HiveShutdown(workers=len(supervisor.registry)).to_json(),
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
            Route("/v1/status", status, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/workers/spawn", spawn_worker, methods=["POST"]),
            Route("/v1/workers/ready", worker_ready, methods=["POST"]),
            Route("/v1/workers/list", list_workers, methods=["GET"]),
            Route("/v1/workers/{worker_id}/stop", stop_worker, methods=["POST"]),
            Route("/v1/rpc/start", rpc_start, methods=["POST"]),
            Route("/v1/rpc/list", rpc_list, methods=["GET"]),
            Route("/v1/rpc/{rpc_id}/stop", rpc_stop, methods=["POST"]),
            Route("/v1/admin/shutdown", shutdown, methods=["POST"]),
        ],
        exception_handlers={RbeeError: on_rbee_error},
        lifespan=lifespan,
    )
