"""Embeddings through the queen: OpenAI's `POST /v1/embeddings` and what Ollama's `/api/embed` needs.

A request is routed like a generation — same catalog names, queue, cold start,
key — but only to workers that serve embeddings (started with `--embedding`;
their `/v1/ready` says so), and a cold start asks the fleet for such a worker.
A worker that cannot be reached is suspected and the request tried on another,
as many times as the relay would; a 400-class answer (an input over the
context, a wrong `dimensions`) is the client's and goes back as it is.

With no way to start workers (registrations only), a model served here only for
text generation is a 400 that says so, not a 503 to retry.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from rbee_worker.app.body import read_json
from rbee_worker.protocol.embeddings import EmbeddingRequest, decode_vector, parse_input
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.wire import invalid

from .catalog import Target
from .generation import RequestRecord
from .relay import CLIENT_ERROR_STATUSES
from .responses import until_disconnect
from .router import busy_error
from .state import QueenState
from .workers import worker_unreachable


async def embeddings(request: Request) -> Response:
    """OpenAI's `/v1/embeddings`; the worker's answer with the name the client asked for."""
    state: QueenState = request.app.state.queen
    record = RequestRecord(state, "embeddings", "-", time.perf_counter())
    request_id = uuid.uuid4().hex
    try:
        req = EmbeddingRequest.from_json(await read_json(request))
        if req.model is None:
            raise invalid("model", "required: a model name from GET /v1/models")
        target = await state.catalog.resolve(req.model)
        record.model = target.model
        try:
            body = await until_disconnect(request, embed(state, target, req, request_id, record))
        except ClientDisconnect:
            record.commit()
            return Response(status_code=499)
    except RbeeError as exc:
        record.error(exc.code)
        record.commit()
        raise
    record.commit()
    body["model"] = target.public_id
    return JSONResponse(body, headers={"X-Request-ID": request_id})


async def embed(
    state: QueenState, target: Target, req: EmbeddingRequest, request_id: str, record: RequestRecord
) -> dict[str, Any]:
    """The worker's OpenAI-shaped answer from some embedding worker of `target`'s model."""
    target = dataclasses.replace(target, embedding=True)
    exclude: set[str] = set()
    last: RbeeError | None = None
    for _attempt in range(state.relay.settings.max_attempts):
        try:
            lease = await state.router.acquire(target, frozenset(exclude))
        except RbeeError as exc:
            raise _generation_only(state, target, exc) from None
        if lease is None:
            break
        worker = lease.worker
        record.node = worker.node
        try:
            body = await worker.client(state.client).embeddings(req, request_id)
        except httpx.HTTPError as exc:
            last = worker_unreachable(worker.entry, exc)
        except RbeeError as exc:
            if exc.status in CLIENT_ERROR_STATUSES:
                raise
            last = exc
        else:
            usage = body.get("usage")
            tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            record.tokens = tokens if isinstance(tokens, int) else 0
            record.outcome = "ok"
            return body
        finally:
            lease.release()
        exclude.add(worker.id)
        state.table.suspect(worker, last)
        state.metrics.retries.labels(target.model).inc()
    raise last or busy_error(target, "no embedding worker accepted the request")


def _generation_only(state: QueenState, target: Target, error: RbeeError) -> RbeeError:
    """No embedding worker and none can be started: if the model is served for text, say so plainly."""
    if error.code != ErrorCode.WORKER_NOT_FOUND:
        return error
    chat_only = [w for w in state.table if w.model == target.model and not w.embedding]
    if not chat_only:
        return error
    return RbeeError(
        ErrorCode.INVALID_REQUEST,
        f"{target.public_id} is served here for text generation only: no worker serves embeddings "
        "for it, and this queen cannot start one",
        status=400,
        details={"field": "model", "model": target.public_id},
        hint="start a worker with --embedding (rbee-worker serve --embedding, or rbee-keeper worker spawn "
        "--embedding) and register it",
    )


# --- Ollama's /api/embed and /api/embeddings ----------------------------------------


def ollama_request(body: dict[str, Any], legacy: bool) -> EmbeddingRequest:
    """Ollama's body as rbee's request: `input` (or the older route's one `prompt`), `truncate`
    (Ollama's default is true: cut to the context), `dimensions`; `options` and `keep_alive` are
    accepted and have no effect (the worker's pooling is fixed when it starts)."""
    texts = parse_input(body.get("prompt") if legacy else body.get("input"), "prompt" if legacy else "input")
    if legacy and len(texts) != 1:
        raise invalid("prompt", "expected one string")
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise invalid("truncate", "expected true or false")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
        raise invalid("dimensions", "expected an integer")
    return EmbeddingRequest(
        input=texts, encoding_format="float", dimensions=dimensions or None, truncate=truncate
    )


async def ollama_embed(
    request: Request, state: QueenState, target: Target, name: str, req: EmbeddingRequest, legacy: bool
) -> Response:
    """Ollama's answer: `{"model", "embeddings": [[...]], durations, "prompt_eval_count"}`,
    or `{"embedding": [...]}` on the older `/api/embeddings`."""
    record = RequestRecord(state, "ollama_embed", target.model, time.perf_counter())
    try:
        answer = await until_disconnect(request, embed(state, target, req, uuid.uuid4().hex, record))
    except ClientDisconnect:
        record.commit()
        return Response(status_code=499)
    except RbeeError as exc:
        record.error(exc.code)
        record.commit()
        raise
    record.commit()
    data = sorted(answer["data"], key=lambda item: int(item.get("index", 0)))
    vectors = [decode_vector(item.get("embedding")) for item in data]
    if legacy:
        return JSONResponse({"embedding": vectors[0]})
    elapsed = round((time.perf_counter() - record.started) * 1e9)
    return JSONResponse(
        {
            "model": name,
            "embeddings": vectors,
            "total_duration": elapsed,
            "load_duration": 0,
            "prompt_eval_count": record.tokens,
        }
    )
