"""Assemble the queen's ASGI app: routes, access checks, error rendering, lifespan.

Middleware is plain ASGI (no `BaseHTTPMiddleware`), so streaming responses are
never buffered and a client disconnect reaches the relay. Order, outermost
first: Host allow-list → CORS (only for allowed origins; a preflight needs no
key) → JSON-only bodies → the two key planes (`access.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rbee_control.inventory.upstreams import Upstream
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from . import dashboard, embeddings, native_routes, ollama_routes, openai_routes, ui_routes
from .access import HostGuard, JsonOnly, PlaneAuth
from .errors import error_response
from .fleet import Fleet
from .metrics import CONTENT_TYPE_LATEST
from .state import QueenSettings, QueenState
from .upstreams import Upstreams

log = logging.getLogger("rbee.queen")


async def health(request: Request) -> Response:
    state: QueenState = request.app.state.queen
    return JSONResponse({"status": "ok", "workers": len(state.table), "ts": time.time()})


async def metrics(request: Request) -> Response:
    state: QueenState = request.app.state.queen
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def list_upstreams(request: Request) -> Response:
    """`GET /v2/upstreams` (admin plane): each external engine, up or down and why, and its models."""
    state: QueenState = request.app.state.queen
    upstreams = [u.to_json() for u in state.upstreams] if state.upstreams is not None else []
    return JSONResponse({"upstreams": upstreams})


async def _rbee_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RbeeError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    code = ErrorCode.NOT_FOUND if status == 404 else ErrorCode.INVALID_REQUEST
    return error_response(RbeeError(code, f"{request.method} {request.url.path}: {exc}", status=status))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    error = RbeeError(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
    return error_response(error)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/models", openai_routes.list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", openai_routes.retrieve_model, methods=["GET"]),
    Route("/v1/chat/completions", openai_routes.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai_routes.completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings.embeddings, methods=["POST"]),
    Route("/v1/inference", native_routes.inference, methods=["POST"]),
    Route("/v1/inference/{request_id}", native_routes.cancel_inference, methods=["DELETE"]),
    *ollama_routes.ROUTES,
    Route("/v2/workers/register", native_routes.register_worker, methods=["POST"]),
    Route("/v2/workers/list", native_routes.list_workers, methods=["GET"]),
    Route("/v2/workers/{worker_id}", native_routes.remove_worker, methods=["DELETE"]),
    Route("/v2/upstreams", list_upstreams, methods=["GET"]),
    Route("/v2/dashboard", dashboard.dashboard, methods=["GET"]),
    *ui_routes.ROUTES,
]


def create_app(
    fleet: Fleet,
    *,
    api_key: str | None = None,
    admin_key: str | None = None,
    settings: QueenSettings | None = None,
    upstreams: Sequence[Upstream] = (),
    upstream_keys: Mapping[str, str | None] | None = None,
) -> Starlette:
    """The queen app over `fleet`; its lifespan owns the HTTP client and stops the fleet on exit.

    `api_key` guards the client plane and `admin_key` the admin plane (`/v2/*`); `None`
    leaves that plane open, which only embedding and tests do (`queen-rbee` always has an
    admin key, and a client key unless `--insecure-no-auth` on loopback). `upstreams` are
    external engines whose models the queen offers too (`upstream_keys`: their API keys).
    """
    settings = settings or QueenSettings()
    middleware = [Middleware(HostGuard, policy=settings.hosts)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["authorization", "content-type", "x-request-id"],
                expose_headers=["x-request-id"],
            )
        )
    middleware += [Middleware(JsonOnly), Middleware(PlaneAuth, client_key=api_key, admin_key=admin_key)]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = QueenState.build(fleet, settings, api_key, time.time())
        app.state.queen = state
        app.state.node_status = dashboard.NodeStatusCache(fleet)
        background = [
            asyncio.create_task(state.table.health_loop(settings.health_interval)),
            asyncio.create_task(state.catalog.entries()),  # warm the model list
            asyncio.create_task(state.router.replicas.loop(state.catalog.resolve, lambda: _kept_warm(fleet))),
        ]
        if upstreams:
            state.upstreams = Upstreams(
                upstreams, upstream_keys or {}, state.metrics, read_timeout=settings.upstream_read_timeout
            )
            background.append(asyncio.create_task(state.upstreams.health_loop(settings.upstream_interval)))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await app.state.node_status.close()
            await state.table.close()
            await state.catalog.close()
            await state.router.close()
            await shutdown_fleet(fleet, settings.shutdown_timeout)
            await state.client.aclose()
            if state.upstreams is not None:
                await state.upstreams.aclose()

    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={
            RbeeError: _rbee_error,
            404: _http_error,
            405: _http_error,
            Exception: _internal_error,
        },
        middleware=middleware,
    )


def _kept_warm(fleet: Fleet) -> list[str]:
    """Models whose inventory placement keeps `min` replicas warm."""
    placements = getattr(fleet, "placements", {})
    return [name for name, p in placements.items() if p.min_replicas > 0]


async def shutdown_fleet(fleet: Fleet, timeout: float) -> None:
    """Stop what the fleet started, bounded: a node that does not answer cannot hold the queen up."""
    try:
        async with asyncio.timeout(timeout):
            await fleet.close()
    except TimeoutError:
        log.error("stopping the fleet took longer than %g s; leaving the rest", timeout)
    except Exception as exc:
        log.error("stopping the fleet failed: %s", exc)
