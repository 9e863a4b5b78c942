"""Assemble the queen's ASGI app: routes, bearer auth, error rendering, lifespan.

Middleware is plain ASGI (no `BaseHTTPMiddleware`), so streaming responses are
never buffered and a client disconnect reaches the relay. Order, outermost
first: CORS (a browser preflight needs no key) → auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from . import native_routes, openai_routes
from .errors import error_response, queen_error_body
from .fleet import Fleet
from .metrics import CONTENT_TYPE_LATEST
from .state import QueenSettings, QueenState

log = logging.getLogger("rbee.queen")

PUBLIC_PATHS = frozenset({"/health"})


class BearerAuth:
    """`Authorization: Bearer <key>` on every route but `/health`; 401 INVALID_API_KEY otherwise."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        error = RbeeError(ErrorCode.INVALID_API_KEY, "missing or wrong bearer token")
        body = json.dumps(queen_error_body(error)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def health(request: Request) -> Response:
    state: QueenState = request.app.state.queen
    return JSONResponse({"status": "ok", "workers": len(state.table), "ts": time.time()})


async def metrics(request: Request) -> Response:
    state: QueenState = request.app.state.queen
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


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
    Route("/v1/chat/completions", openai_routes.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai_routes.completions, methods=["POST"]),
    Route("/v1/inference", native_routes.inference, methods=["POST"]),
    Route("/v1/inference/{request_id}", native_routes.cancel_inference, methods=["DELETE"]),
    Route("/v2/workers/register", native_routes.register_worker, methods=["POST"]),
    Route("/v2/workers/list", native_routes.list_workers, methods=["GET"]),
    Route("/v2/workers/{worker_id}", native_routes.remove_worker, methods=["DELETE"]),
]


def create_app(
    fleet: Fleet, *, api_key: str | None = None, settings: QueenSettings | None = None
) -> Starlette:
    """The queen app over `fleet`; its lifespan owns the HTTP client and stops the fleet on exit."""
    settings = settings or QueenSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = QueenState.build(fleet, settings, api_key, time.time())
        app.state.queen = state
        background = [
            asyncio.create_task(state.table.health_loop(settings.health_interval)),
            asyncio.create_task(state.catalog.entries()),  # warm the model list
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await state.table.close()
            await state.router.close()
            await shutdown_fleet(fleet, settings.shutdown_timeout)
            await state.client.aclose()

    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={
            RbeeError: _rbee_error,
            404: _http_error,
            405: _http_error,
            Exception: _internal_error,
        },
        middleware=[
            Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]),
            Middleware(BearerAuth, api_key=api_key),
        ],
    )


async def shutdown_fleet(fleet: Fleet, timeout: float) -> None:
    """Stop what the fleet started, bounded: a node that does not answer cannot hold the queen up."""
    try:
        async with asyncio.timeout(timeout):
            await fleet.close()
    except TimeoutError:
        log.error("stopping the fleet took longer than %g s; leaving the rest", timeout)
    except Exception as exc:
        log.error("stopping the fleet failed: %s", exc)
