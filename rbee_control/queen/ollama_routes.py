"""Ollama's API on the queen: `/api/chat`, `/api/generate`, `/api/tags`, `/api/ps`, `/api/show`, ….

Clients that speak Ollama (Open WebUI, Continue, Zed, LangChain, the `ollama`
package) get the same models, routing, queueing, cold starts, failover and key
as OpenAI clients: generation goes through `generation.py` like the OpenAI
routes, only the wire format differs. Streams are NDJSON; a failure after the
first token is a final `{"error": "..."}` line (the Ollama client raises on it),
and every other error is Ollama's `{"error": "..."}` with its HTTP status.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rbee_control import __version__
from rbee_worker.app.body import read_json
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from . import embeddings, ollama_models
from .catalog import Target
from .fleet import ModelEntry
from .generation import Finished, Piece, RequestRecord, collect, outputs, worker_request
from .ollama_api import Kind, Shapes, Timings, done_reason, error_body, ndjson, now_iso, parse, parse_model
from .relay import Upstream
from .responses import RelayResponse, until_disconnect
from .state import QueenState

#: The Ollama release whose API these routes follow; clients show it and some gate features on it.
OLLAMA_VERSION = "0.6.0"
NDJSON_MEDIA_TYPE = "application/x-ndjson"

Handler = Callable[[Request], Awaitable[Response]]


def _state(request: Request) -> QueenState:
    return request.app.state.queen


def error_response(error: RbeeError) -> JSONResponse:
    headers = {}
    retry_after = error.details.get("retry_after")
    if isinstance(retry_after, int | float):
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return JSONResponse(error_body(error), status_code=error.status, headers=headers or None)


def ollama_errors(handler: Handler) -> Handler:
    """Errors in Ollama's shape, `{"error": "..."}`, whatever raised them."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except RbeeError as exc:
            return error_response(exc)

    return wrapped


async def _resolve(state: QueenState, name: str) -> Target:
    """Ollama clients often add the default tag: `model:latest` is `model` when no such name exists."""
    try:
        return await state.catalog.resolve(name)
    except RbeeError as exc:
        base = name.removesuffix(":latest")
        if exc.code != ErrorCode.MODEL_NOT_FOUND or base == name:
            raise
        return await state.catalog.resolve(base)


@ollama_errors
async def chat(request: Request) -> Response:
    return await _generate(request, "chat")


@ollama_errors
async def generate(request: Request) -> Response:
    return await _generate(request, "generate")


async def _generate(request: Request, kind: Kind) -> Response:
    state = _state(request)
    record = RequestRecord(state, f"ollama_{kind}", "-", time.perf_counter())
    try:
        req = parse(kind, await read_json(request))
        target = await _resolve(state, req.model)
        record.model = target.model
        shapes = Shapes(kind, req.model)
        if req.unload:  # workers belong to the queen; a client cannot stop them
            return JSONResponse(shapes.final("", "unload", None))
        if req.parsed is None:
            return await _load(state, target, shapes, record)
        infer = worker_request(req.parsed, target)
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id}
        if not req.stream:
            try:
                text, finished = await until_disconnect(
                    request, collect(state, target, infer, request_id, record)
                )
            except ClientDisconnect:
                record.commit()
                return Response(status_code=499)
            record.commit()
            body = shapes.final(text, done_reason(finished.stop_reason), _timings(record, finished))
            return JSONResponse(body, headers=headers)
        upstream = await state.relay.open(target, infer, request_id)
        record.committed = time.perf_counter()
    except RbeeError as exc:
        record.error(exc.code)
        record.commit()
        raise
    record.node = upstream.worker.node
    return RelayResponse(
        _stream(upstream, shapes, record), upstream, record.commit, headers, media_type=NDJSON_MEDIA_TYPE
    )


async def _load(state: QueenState, target: Target, shapes: Shapes, record: RequestRecord) -> Response:
    """An empty prompt or message list: Ollama loads the model; here that is a cold start if needed."""
    lease = await state.router.acquire(target)
    if lease is not None:
        record.node = lease.worker.node
        lease.release()
    record.outcome = "ok"
    record.commit()
    return JSONResponse(shapes.final("", "load", None))


def _timings(record: RequestRecord, finished: Finished) -> Timings:
    """Ollama's counters: `load` is the wait for a worker (queue, cold start), the rest the worker's own."""
    ttft = finished.ttft_ms / 1000
    load = max(0.0, record.committed - record.started - ttft) if record.committed else 0.0
    return Timings(
        total=time.perf_counter() - record.started,
        load=load,
        prompt_eval_count=finished.prompt_tokens,
        prompt_eval=ttft,
        eval_count=finished.tokens_out,
        eval=finished.decode_ms / 1000,
    )


async def _stream(upstream: Upstream, shapes: Shapes, record: RequestRecord) -> AsyncIterator[bytes]:
    """One NDJSON object per token, one write per batch of worker events."""
    async for batch in outputs(upstream, record):
        created_at = now_iso()
        out: list[bytes] = []
        for item in batch:
            if isinstance(item, str | Piece):  # Ollama requests never ask for log-probabilities
                out.append(ndjson(shapes.chunk(item if isinstance(item, str) else item.text, created_at)))
            elif isinstance(item, Finished):
                out.append(ndjson(shapes.final("", done_reason(item.stop_reason), _timings(record, item))))
            else:
                out.append(ndjson(error_body(item)))
        yield b"".join(out)


@ollama_errors
async def tags(request: Request) -> Response:
    state = _state(request)
    return JSONResponse(ollama_models.tags(await state.catalog.public_models(), state.started_at))


@ollama_errors
async def ps(request: Request) -> Response:
    """Running workers, each with the name a client would ask for."""
    state = _state(request)
    names: dict[tuple[str, str], tuple[str, ModelEntry]] = {}
    for model in await state.catalog.public_models():
        for entry in model.entries:
            names[(entry.name, entry.node)] = (model.id, entry)
    rows = []
    for worker in sorted(state.table, key=lambda w: (w.model, w.node, w.id)):
        fallback = (worker.model, worker.meta or ModelEntry(worker.model, worker.node))
        name, entry = names.get((worker.model, worker.node), fallback)
        rows.append((name, worker, entry))
    return JSONResponse(ollama_models.running(rows, state.started_at))


@ollama_errors
async def show(request: Request) -> Response:
    state = _state(request)
    name = parse_model(await read_json(request))
    target = await _resolve(state, name)
    return JSONResponse(ollama_models.show(name, target.entry, state.started_at))


@ollama_errors
async def embed(request: Request) -> Response:
    """`/api/embed` and the older `/api/embeddings`: routed to embedding workers like `/v1/embeddings`."""
    state = _state(request)
    body = await read_json(request)
    name = parse_model(body)
    legacy = request.url.path.endswith("/embeddings")
    req = embeddings.ollama_request(body, legacy)  # a bad body is a 400 whatever the model
    return await embeddings.ollama_embed(request, state, await _resolve(state, name), name, req, legacy)


@ollama_errors
async def manage(request: Request) -> Response:
    """pull, push, create, copy, delete: models are managed per node with rbee-keeper, not through here."""
    raise RbeeError(
        ErrorCode.INVALID_REQUEST,
        f"{request.url.path} is not supported: rbee manages models per node",
        status=501,
        hint="rbee-keeper models add REF --node NODE (and models rm) on the operator's machine",
    )


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION, "rbee": __version__})


ROUTES = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/embed", embed, methods=["POST"]),
    Route("/api/embeddings", embed, methods=["POST"]),
    Route("/api/version", version, methods=["GET"]),
    *(Route(f"/api/{name}", manage, methods=["POST", "DELETE"])
      for name in ("pull", "push", "create", "copy", "delete")),
]  # fmt: skip
