"""`GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from rbee_worker.app.body import read_json
from rbee_worker.protocol import events
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.request import InferenceRequest

from . import keepalive
from .catalog import Target
from .errors import sse_error
from .generation import Finished, RequestRecord, collect, outputs, worker_request
from .openai_api import Kind, Shapes, parse_request
from .relay import Upstream
from .responses import RelayResponse, until_disconnect
from .state import QueenState

ROUTE_NAMES: dict[Kind, str] = {"chat": "chat", "completion": "completions"}


def _state(request: Request) -> QueenState:
    return request.app.state.queen


async def list_models(request: Request) -> Response:
    state = _state(request)
    models = await state.catalog.public_models()
    created = int(state.started_at)
    data = [{"id": m.id, "object": "model", "created": created, "owned_by": m.owned_by} for m in models]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    """`GET /v1/models/{id}`: a listed id, or any name a request may use (`node/name` pins);
    an unknown one is 404 in OpenAI's error shape (`param: model`)."""
    state = _state(request)
    model_id = request.path_params["model_id"]
    models = await state.catalog.public_models()
    found = next((m for m in models if m.id == model_id), None)
    owned_by = found.owned_by if found else (await state.catalog.resolve(model_id)).entry.node
    return JSONResponse(
        {"id": model_id, "object": "model", "created": int(state.started_at), "owned_by": owned_by}
    )


async def chat_completions(request: Request) -> Response:
    return await _complete(request, "chat")


async def completions(request: Request) -> Response:
    return await _complete(request, "completion")


async def _complete(request: Request, kind: Kind) -> Response:
    state = _state(request)
    record = RequestRecord(state, ROUTE_NAMES[kind], "-", time.perf_counter())
    try:
        parsed = parse_request(kind, await read_json(request))
        target = await state.catalog.resolve(parsed.model)
        record.model = target.model
        infer = worker_request(parsed, target)
        request_id = uuid.uuid4().hex
        shapes = Shapes(kind, request_id, target.public_id, parsed.include_usage)
        headers = {"X-Request-ID": request_id}
        if not parsed.stream:
            try:
                body = await until_disconnect(
                    request, _collect(state, target, infer, request_id, shapes, record)
                )
            except ClientDisconnect:
                record.commit()
                return Response(status_code=499)
            record.commit()
            return JSONResponse(body, headers=headers)
        opening = asyncio.ensure_future(state.relay.open(target, infer, request_id))
        upstream = await keepalive.first_wait(opening, state.settings.sse_keepalive)
    except RbeeError as exc:
        record.error(exc.code)
        record.commit()
        raise
    if upstream is None:  # still queued or cold-starting: answer now, ping until the worker commits

        def relay_body(upstream: Upstream) -> AsyncIterator[bytes]:
            record.node = upstream.worker.node
            return _stream(upstream, shapes, record)

        def failed(error: RbeeError) -> bytes:
            record.error(error.code)
            return sse_error(error) + events.encode_done()

        interval = state.settings.sse_keepalive
        return keepalive.WaitingResponse(opening, interval, relay_body, failed, record.commit, headers)
    record.node = upstream.worker.node
    return RelayResponse(_stream(upstream, shapes, record), upstream, record.commit, headers)


async def _stream(upstream: Upstream, shapes: Shapes, record: RequestRecord) -> AsyncIterator[bytes]:
    """OpenAI chunks, one write per batch of worker events (each token still its own chunk)."""
    first = shapes.first_chunk()
    if first is not None:
        yield first
    async for batch in outputs(upstream, record):
        out: list[bytes] = []
        for item in batch:
            if isinstance(item, str):
                out.append(shapes.text_chunk(item))
            elif isinstance(item, Finished):
                out.append(shapes.final_chunk(item.stop_reason))
                if shapes.include_usage:
                    out.append(shapes.usage_chunk(item.prompt_tokens, item.tokens_out))
            else:
                out.append(sse_error(item))
        yield b"".join(out)
    yield events.encode_done()


async def _collect(
    state: QueenState,
    target: Target,
    infer: InferenceRequest,
    request_id: str,
    shapes: Shapes,
    record: RequestRecord,
) -> dict[str, object]:
    text, finished = await collect(state, target, infer, request_id, record)
    return shapes.completion(text, finished.stop_reason, finished.prompt_tokens, finished.tokens_out)
