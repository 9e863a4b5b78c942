"""HTTP routes of the worker (DESIGN §5)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..protocol import events
from ..protocol.errors import ErrorCode, RbeeError
from ..protocol.request import InferenceRequest
from . import embeddings
from .body import read_json
from .constraints import prepare_constraints
from .generation import Generation, GenerationStats
from .metrics import CONTENT_TYPE_LATEST
from .slots import Slot
from .state import Phase, WorkerState
from .state import check_serving as _check_serving

access_log = logging.getLogger("rbee.access")


def _state(request: Request) -> WorkerState:
    return request.app.state.worker


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "ts": time.time()})


async def ready(request: Request) -> Response:
    state = _state(request)
    return JSONResponse(state.ready_body(), status_code=200 if state.phase is Phase.READY else 503)


async def loading_progress(request: Request) -> Response:
    state = _state(request)

    async def stream() -> AsyncIterator[bytes]:
        while True:
            changed = state.changed
            yield events.encode_event(events.PROGRESS, state.ready_body())
            if state.phase is not Phase.LOADING:
                break
            await changed.wait()
        yield events.encode_done()

    return StreamingResponse(stream(), media_type=events.SSE_MEDIA_TYPE, headers=events.SSE_HEADERS)


async def inference(request: Request) -> Response:
    state = _state(request)
    _check_serving(state)
    if state.embedder is not None:
        raise embeddings.generation_refused()
    infer = InferenceRequest.from_json(await read_json(request))
    if infer.messages is not None:
        assert state.chat is not None  # set before the worker is ready
        infer = await state.chat.prepare(infer)
    infer = await prepare_constraints(infer, state.pool.runtime)
    request_id = request.state.request_id
    if request_id in state.generations:
        raise RbeeError(ErrorCode.INVALID_REQUEST, f"request id {request_id} is already running", status=409)
    state.pool.reserve()
    state.metrics.queue_depth.set(state.pool.waiting)
    return StreamingResponse(
        _stream(state, request_id, infer),
        media_type=events.SSE_MEDIA_TYPE,
        headers=events.SSE_HEADERS,
    )


async def _stream(state: WorkerState, request_id: str, infer: InferenceRequest) -> AsyncIterator[bytes]:
    """Wait for a slot, stream one generation; the slot is released by its thread's end."""
    metrics = state.metrics
    acquiring = asyncio.ensure_future(state.pool.acquire())
    try:
        while not (await asyncio.wait({acquiring}, timeout=state.config.keepalive_s))[0]:
            yield events.encode_comment()  # queued: a comment keeps proxies and read timeouts patient
        slot = acquiring.result()
    except BaseException:
        _give_back(state, acquiring)
        raise
    metrics.queue_depth.set(state.pool.waiting)
    metrics.slots_busy.set(state.pool.busy)

    generation = Generation(request_id, infer, slot.runtime)
    state.generations[request_id] = generation
    loop = asyncio.get_running_loop()

    def finish() -> None:
        state.generations.pop(request_id, None)
        state.pool.release(slot)
        stats = generation.stats
        metrics.slots_busy.set(state.pool.busy)
        if stats.tokens_out:
            metrics.tokens.inc(stats.tokens_out)
            metrics.ttft.observe(stats.ttft_ms / 1000)
            metrics.decode.observe(stats.decode_ms / 1000 / stats.tokens_out)

    def run_then_release(work: object) -> None:
        def body() -> None:
            try:
                work()  # type: ignore[operator]
            finally:
                loop.call_soon_threadsafe(finish)

        slot.run_on_thread(body)

    outcome = "error"
    started = time.monotonic()
    try:
        generation.start(run_then_release)
        yield events.encode_event(events.STARTED, {"request_id": request_id, "model": state.model_name})
        async for batch in generation.batches():
            metrics.last_token.set(time.time())
            yield b"".join(events.token_event(text, index, logprobs) for text, index, logprobs in batch)
        stats = generation.stats
        outcome = "cancelled" if stats.stop_reason == events.STOP_CANCELLED else "ok"
        yield events.encode_event(events.END, stats.end_payload())
    except RbeeError as exc:
        yield events.encode_event(events.ERROR, exc.body()["error"])
    except BaseException:
        outcome = "disconnected"
        raise
    finally:
        generation.cancel()
        metrics.requests.labels(outcome).inc()
        _access(state, request_id, generation.stats, outcome, time.monotonic() - started)
    yield events.encode_done()


def _access(state: WorkerState, request_id: str, stats: GenerationStats, status: str, seconds: float) -> None:
    """One line per request: what `rbee-keeper logs --worker ID` shows an operator."""
    access_log.info(
        "request_id=%s model=%s tokens_in=%d tokens_out=%d ttft_ms=%.1f duration_ms=%.1f status=%s "
        "cancelled=%s",
        request_id, state.model_name, stats.prompt_tokens, stats.tokens_out, stats.ttft_ms,
        seconds * 1000, status, str(stats.stop_reason == events.STOP_CANCELLED).lower(),
    )  # fmt: skip


def _give_back(state: WorkerState, acquiring: asyncio.Future[Slot]) -> None:
    """A queued request left: its slot goes back if it had just got one, else its place in the queue."""
    if acquiring.done() and not acquiring.cancelled() and acquiring.exception() is None:
        state.pool.release(acquiring.result())
    else:
        acquiring.cancel()
        state.pool.unreserve()


async def cancel_inference(request: Request) -> Response:
    state = _state(request)
    request_id = request.path_params["request_id"]
    generation = state.generations.get(request_id)
    if generation is None:
        raise RbeeError(ErrorCode.NOT_FOUND, f"no running request {request_id}", status=404)
    generation.cancel()
    return JSONResponse({"request_id": request_id, "cancelled": True})


async def admin_shutdown(request: Request) -> Response:
    state = _state(request)
    drain = request.app.state.drain
    if state.phase is not Phase.DRAINING:
        asyncio.get_running_loop().call_soon(drain)
    return JSONResponse({"state": "draining", "running": len(state.generations)}, status_code=202)


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.queue_depth.set(state.pool.waiting)
    state.metrics.slots_busy.set(state.pool.busy)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/v1/ready", ready, methods=["GET"]),
    Route("/v1/loading/progress", loading_progress, methods=["GET"]),
    Route("/v1/inference", inference, methods=["POST"]),
    Route("/v1/inference/{request_id}", cancel_inference, methods=["DELETE"]),
    Route("/v1/embeddings", embeddings.embeddings, methods=["POST"]),
    Route("/v1/admin/shutdown", admin_shutdown, methods=["POST"]),
    Route("/metrics", metrics, methods=["GET"]),
]
PUBLIC_PATHS = frozenset({"/health"})
