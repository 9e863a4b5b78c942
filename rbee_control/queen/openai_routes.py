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
from .generation import Finished, Piece, RequestRecord, collect, outputs, worker_request
from .openai_api import Kind, OpenAIRequest, Shapes, parse_request
from .relay import Upstream
from .responses import RelayResponse, until_disconnect
from .state import QueenState
from .tools import ToolCall, ToolStream
from .upstream_relay import relay
from .upstreams import UpstreamTarget

ROUTE_NAMES: dict[Kind, str] = {"chat": "chat", "completion": "completions"}
UPSTREAM_PATHS: dict[Kind, str] = {"chat": "chat/completions", "completion": "completions"}


def _state(request: Request) -> QueenState:
    return request.app.state.queen


async def list_models(request: Request) -> Response:
    state = _state(request)
    models = await state.catalog.public_models()
    created = int(state.started_at)
    data = [{"id": m.id, "object": "model", "created": created, "owned_by": m.owned_by} for m in models]
    if state.upstreams is not None:
        local = {m.id for m in models}
        data += [
            {"id": model, "object": "model", "created": created, "owned_by": owner}
            for model, owner in state.upstreams.public_models(local)
        ]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    """`GET /v1/models/{id}`: a listed id, or any name a request may use (`node/name` pins);
    an unknown one is 404 in OpenAI's error shape (`param: model`)."""
    state = _state(request)
    model_id = request.path_params["model_id"]
    models = await state.catalog.public_models()
    found = next((m for m in models if m.id == model_id), None)
    external = None
    if found is None and state.upstreams is not None:
        external = await state.upstreams.resolve(model_id, {m.id for m in models})
    if found is not None:
        owned_by = found.owned_by
    elif external is not None:
        owned_by = external.state.name
    else:
        owned_by = (await state.catalog.resolve(model_id)).entry.node
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
    parsed: OpenAIRequest | None = None
    try:
        body = await read_json(request)
        external = await _external(state, body)
        if external is not None:
            assert state.upstreams is not None
            return await relay(state.upstreams, external, UPSTREAM_PATHS[kind], body, record)
        parsed = parse_request(kind, body)
        target = await state.catalog.resolve(parsed.model)
        record.model = target.model
        infer = worker_request(parsed, target)
        request_id = uuid.uuid4().hex
        shapes = Shapes(kind, request_id, target.public_id, parsed.include_usage)
        headers = {"X-Request-ID": request_id}
        if not parsed.stream:
            try:
                body = await until_disconnect(
                    request, _collect(state, target, infer, request_id, shapes, record, parsed)
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
        raise parsed.renamed(exc) if parsed is not None else exc from None
    if upstream is None:  # still queued or cold-starting: answer now, ping until the worker commits
        opened_for: OpenAIRequest = parsed

        def relay_body(upstream: Upstream) -> AsyncIterator[bytes]:
            record.node = upstream.worker.node
            return _stream(upstream, shapes, record, opened_for)

        def failed(error: RbeeError) -> bytes:
            record.error(error.code)
            return sse_error(opened_for.renamed(error)) + events.encode_done()

        interval = state.settings.sse_keepalive
        return keepalive.WaitingResponse(opening, interval, relay_body, failed, record.commit, headers)
    record.node = upstream.worker.node
    return RelayResponse(_stream(upstream, shapes, record, parsed), upstream, record.commit, headers)


async def _external(state: QueenState, body: object) -> UpstreamTarget | None:
    """The upstream engine serving the body's model, if not one of rbee's own (rbee's win a tie)."""
    if state.upstreams is None or not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return None
    local = {m.id for m in await state.catalog.public_models()}
    return await state.upstreams.resolve(body["model"], local)


async def _stream(
    upstream: Upstream, shapes: Shapes, record: RequestRecord, parsed: OpenAIRequest
) -> AsyncIterator[bytes]:
    """OpenAI chunks, one write per batch of worker events (each token still its own chunk).

    With tools, text that may still turn out to be a call is held back (`ToolStream`)."""
    first = shapes.first_chunk()
    if first is not None:
        yield first
    tools = ToolStream(parsed.tools) if parsed.tools is not None else None
    sent = 0
    async for batch in outputs(upstream, record):
        out: list[bytes] = []
        for item in batch:
            if isinstance(item, str | Piece):
                text = item if isinstance(item, str) else item.text
                if tools is not None:
                    text = tools.feed(text)
                    if text:
                        out.append(shapes.text_chunk(text))
                elif isinstance(item, Piece):
                    out.append(shapes.logprob_chunk(text, item.logprobs, sent))
                else:
                    out.append(shapes.text_chunk(text))
                sent += len(text)
            elif isinstance(item, Finished):
                calls: list[ToolCall] | None = None
                if tools is not None:
                    held, calls = tools.finish()
                    if held:
                        out.append(shapes.text_chunk(held))
                    if calls:
                        out.append(shapes.tool_calls_chunk(calls))
                out.append(shapes.final_chunk(item.stop_reason, tool_calls=bool(calls)))
                if shapes.include_usage:
                    out.append(shapes.usage_chunk(item.prompt_tokens, item.tokens_out))
            else:
                out.append(sse_error(parsed.renamed(item)))
        yield b"".join(out)
    yield events.encode_done()


async def _collect(
    state: QueenState,
    target: Target,
    infer: InferenceRequest,
    request_id: str,
    shapes: Shapes,
    record: RequestRecord,
    parsed: OpenAIRequest,
) -> dict[str, object]:
    logprobs: list[dict[str, object]] | None = [] if parsed.logprobs else None
    text, finished = await collect(state, target, infer, request_id, record, logprobs)
    calls = parsed.tools.calls(text) if parsed.tools is not None else None
    return shapes.completion(
        text, finished.stop_reason, finished.prompt_tokens, finished.tokens_out, logprobs, calls
    )
