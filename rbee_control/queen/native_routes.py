"""rbee's own routes on the queen: worker registration and listing, and the native inference stream.

`POST /v1/inference` takes the worker's body plus `model` and relays the worker's
SSE stream byte for byte (failover before the first token included), so the
keeper can talk to the queen exactly as it talks to a worker.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbee_worker.app.body import read_json
from rbee_worker.protocol import events
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.queen_api import WorkerRegistration
from rbee_worker.protocol.request import InferenceRequest

from .access import ANONYMOUS
from .fleet import ModelEntry, WorkerEntry
from .recent import RecentSeen
from .registration import check_model_name, check_name
from .relay import Upstream
from .replicas import placement_of
from .responses import RelayResponse
from .state import QueenState
from .workers import RoutedWorker

CORRELATION_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _state(request: Request) -> QueenState:
    return request.app.state.queen


def _invalid(field: str, message: str) -> RbeeError:
    return RbeeError(ErrorCode.INVALID_REQUEST, f"{field}: {message}", details={"field": field})


async def register_worker(request: Request) -> Response:
    """Verify the worker answers `/v1/ready` to the given key, then route to it."""
    state = _state(request)
    reg = WorkerRegistration.from_json(await read_json(request))
    node = check_name("node", reg.node or reg.host)
    if reg.id is not None:
        check_name("id", reg.id)
    if reg.model is not None:
        check_model_name(reg.model)
    # Checked before the probe: a refused address is never contacted.
    await state.settings.registration.admit(reg.host)
    existing = _check_conflicts(state, reg.id, reg.url)
    worker_id = reg.id or (existing.id if existing else f"w-{secrets.token_hex(4)}")
    probe = WorkerEntry(worker_id, node, reg.url, reg.api_key, reg.model or "")
    try:
        ready = await state.table.check(probe)
    except RbeeError as exc:
        raise RbeeError(
            exc.code if exc.status == 400 else ErrorCode.CONNECTION_FAILED,
            f"not registered: {exc.message}",
            status=exc.status if exc.status == 400 else 502,
            details={"url": reg.url, "field": "url" if exc.status != 400 else "api_key"},
        ) from None
    _check_conflicts(state, worker_id, reg.url)  # the table may have changed during the probe
    model = probe.model or check_model_name(ready.model or "")
    if not model:
        raise _invalid("model", "required (the worker did not name its model)")
    entry = WorkerEntry(worker_id, node, reg.url, reg.api_key, model)
    meta = ModelEntry(
        model,
        node,
        context_length=reg.context_length,
        chat_template=reg.chat_template,
        bos_token=reg.bos_token,
        eos_token=reg.eos_token,
    )
    worker = RoutedWorker(
        entry,
        slots=ready.slots or reg.slots or 1,
        meta=meta,
        backend=reg.backend or ready.backend,
        device=reg.device if reg.device is not None else ready.device,
        vram_bytes=reg.vram_bytes if reg.vram_bytes is not None else ready.vram_bytes,
        embedding=ready.embedding,
    )
    state.table.add(worker)
    return JSONResponse(worker.public().to_json(), status_code=201)


def _conflict(message: str, worker_id: str) -> RbeeError:
    details = {"field": "id", "worker": worker_id}
    return RbeeError(ErrorCode.WORKER_EXISTS, message, details=details)


def _check_conflicts(state: QueenState, worker_id: str | None, url: str) -> RoutedWorker | None:
    """The entry this registration updates (same worker again), or None for a new one.

    An id names one worker: taking it over for another URL would send that worker's
    traffic to whoever asked. A worker the queen started itself is never replaced.
    """
    by_url = state.table.find_url(url)
    if by_url is not None and by_url.owned:
        raise _conflict(f"the worker at {url} was started by this queen, not re-registered", by_url.id)
    if worker_id is not None:
        by_id = state.table.get(worker_id)
        if by_id is not None and by_id.owned:
            raise _conflict(f"worker {worker_id} was started by this queen and cannot be replaced", worker_id)
        if by_id is not None and by_id.url != url:
            raise _conflict(f"worker {worker_id} is already registered at another URL", worker_id)
        if by_id is not None:
            return by_id
    existing = by_url if worker_id is None or by_url is None or by_url.id == worker_id else None
    if existing is None and len(state.table) >= state.settings.registration.max_workers:
        raise RbeeError(
            ErrorCode.TOO_MANY_WORKERS,
            f"the routing table is full ({state.settings.registration.max_workers} workers)",
            details={"retry_after": 60},
        )
    return existing


async def list_workers(request: Request) -> Response:
    state = _state(request)
    workers = sorted(state.table, key=lambda w: (w.model, w.node, w.id))
    replicas = {}
    for model in dict.fromkeys(w.model for w in workers):
        placement = placement_of(state.fleet, model)
        nodes = [w.node for w in workers if w.model == model]
        replicas[model] = {
            "workers": len(nodes),
            "nodes": nodes,
            "min": placement.min_replicas,
            "max": placement.max_replicas,
            "split": list(placement.split),
        }
    return JSONResponse({"workers": [w.public().to_json() for w in workers], "replicas": replicas})


async def remove_worker(request: Request) -> Response:
    """Stop routing to a worker (the process is left alone)."""
    state = _state(request)
    worker_id = request.path_params["worker_id"]
    worker = state.table.get(worker_id)
    if worker is None:
        raise RbeeError(ErrorCode.WORKER_NOT_FOUND, f"no worker {worker_id}")
    state.table.remove(worker, "deregistered")
    return JSONResponse({"id": worker_id, "removed": True})


async def inference(request: Request) -> Response:
    state = _state(request)
    started = time.perf_counter()
    body = await read_json(request)
    if not isinstance(body, dict):
        raise _invalid("body", "expected a JSON object")
    model = body.pop("model", None)
    if model is None:
        offered = await state.catalog.public_models()
        if len(offered) != 1:
            raise _invalid("model", f"required when the queen offers {len(offered)} models")
        model = offered[0].id
    if not isinstance(model, str) or not model:
        raise _invalid("model", "expected a non-empty string")
    infer = InferenceRequest.from_json(body)
    target = await state.catalog.resolve(model)
    if infer.messages is not None and infer.chat_template is None:
        infer.chat_template = target.entry.chat_template  # as /v1/chat/completions does
    # The queen names the request; a client's X-Request-ID is only a correlation field, so one
    # client cannot pick (and then cancel) an id another client's request has.
    given = request.headers.get("x-request-id", "")
    correlation = given if CORRELATION_ID_RE.fullmatch(given) else None
    request_id = uuid.uuid4().hex
    principal = request.scope.get("state", {}).get("principal", ANONYMOUS)
    try:
        upstream = await state.relay.open(target, infer, request_id)
    except RbeeError as exc:
        state.metrics.errors.labels(exc.code).inc()
        state.metrics.requests.labels("inference", target.model, "-", "error").inc()
        raise
    state.running[request_id] = upstream
    state.owners[request_id] = principal
    outcome = {"value": "disconnected"}
    seen = RecentSeen()

    async def relay() -> AsyncIterator[bytes]:
        first = True
        async for batch in upstream.batches():
            for _raw, event in batch:
                if event.name == events.TOKEN and first:
                    first = False
                    seen.ttft = time.perf_counter() - started
                    state.metrics.ttft.labels(target.model, upstream.worker.node).observe(seen.ttft)
                elif event.name == events.END:
                    outcome["value"] = "ok"
                    seen.tokens = int(event.data.get("tokens_out", 0))
                    seen.decode_ms = float(event.data.get("decode_ms", 0.0))
                    state.metrics.tokens.labels(target.model, upstream.worker.node).inc(seen.tokens)
                elif event.name == events.ERROR:
                    outcome["value"] = "error"
                    seen.error = str(event.data.get("code"))
                    state.metrics.errors.labels(seen.error).inc()
            yield b"".join(raw for raw, _event in batch)
        yield events.encode_done()

    def done() -> None:
        state.running.pop(request_id, None)
        state.owners.pop(request_id, None)
        state.metrics.requests.labels("inference", target.model, upstream.worker.node, outcome["value"]).inc()
        state.recent.add(
            seen.request(
                state.recent.next_seq(),
                "inference",
                target.model,
                upstream.worker.node,
                upstream.worker.id,
                outcome["value"],
                started,
            )
        )

    headers = {"X-Request-ID": request_id}
    if correlation is not None:
        headers["X-Correlation-ID"] = correlation
    return RelayResponse(relay(), upstream, done, headers)


async def cancel_inference(request: Request) -> Response:
    state = _state(request)
    request_id = request.path_params["request_id"]
    upstream: Upstream | None = state.running.get(request_id)
    if upstream is None:
        raise RbeeError(ErrorCode.NOT_FOUND, f"no running request {request_id}")
    principal = request.scope.get("state", {}).get("principal", ANONYMOUS)
    if state.owners.get(request_id) != principal:
        raise RbeeError(ErrorCode.FORBIDDEN, f"request {request_id} was started with another key")
    cancelled = await state.relay.delete(upstream.worker, upstream.request_id)
    return JSONResponse({"request_id": request_id, "cancelled": cancelled})
