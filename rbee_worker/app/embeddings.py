"""`POST /v1/embeddings` on a worker started with `--embedding`.

Inputs are tokenized and measured before the request takes a slot, so an input
longer than the context is a 400 naming `input` (and which item) that costs the
worker nothing. The slot pool admits embedding requests like generations:
`slots` at once, `queue` waiting, then 503 ALL_SLOTS_BUSY.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..protocol.embeddings import EmbeddingRequest, embedding_response
from ..protocol.errors import ErrorCode, RbeeError
from ..protocol.wire import invalid
from .body import read_json
from .state import WorkerState, check_serving


def generation_refused() -> RbeeError:
    return RbeeError(
        ErrorCode.INVALID_REQUEST,
        "this worker serves embeddings (started with --embedding), not text generation; "
        "start another worker without --embedding for completions",
        status=400,
        details={"field": "model", "embedding": True},
    )


def embeddings_refused(model: str) -> RbeeError:
    return RbeeError(
        ErrorCode.INVALID_REQUEST,
        f"this worker serves text generation with {model}, not embeddings; "
        "embeddings need a worker started with --embedding",
        status=400,
        details={"field": "model", "embedding": False},
        hint="rbee-keeper worker spawn --model MODEL --node NODE --embedding",
    )


async def embeddings(request: Request) -> Response:
    state: WorkerState = request.app.state.worker
    check_serving(state)
    runtime = state.embedder
    if runtime is None:
        raise embeddings_refused(state.model_name)
    req = EmbeddingRequest.from_json(await read_json(request))
    if req.dimensions is not None and req.dimensions != runtime.dimensions:
        raise invalid("dimensions", f"this model's embeddings have {runtime.dimensions} dimensions")
    tokens = await asyncio.to_thread(lambda: [runtime.tokenize(text) for text in req.input])
    context = runtime.context_length
    for index, ids in enumerate(tokens):
        if len(ids) <= context:
            continue
        if not req.truncate:
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                f"input: item {index} is {len(ids)} tokens, more than the {context}-token context",
                status=400,
                details={"field": "input", "index": index, "tokens": len(ids), "context": context},
            )
        tokens[index] = ids[:context]
    pool = state.pool
    pool.reserve()
    try:
        slot = await pool.acquire()
    except BaseException:
        pool.unreserve()
        raise
    state.metrics.slots_busy.set(pool.busy)
    outcome = "error"
    try:
        vectors = await asyncio.to_thread(runtime.embed, tokens)
        outcome = "ok"
    except (RuntimeError, ValueError) as exc:
        raise RbeeError(ErrorCode.INFERENCE_FAILED, f"embedding failed: {exc}") from None
    finally:
        pool.release(slot)
        state.metrics.slots_busy.set(pool.busy)
        state.metrics.requests.labels(outcome).inc()
    prompt_tokens = sum(len(ids) for ids in tokens)
    return JSONResponse(embedding_response(vectors, req.encoding_format, state.model_name, prompt_tokens))
