"""`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from rbee_worker.app.body import read_json
from rbee_worker.protocol import events
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.request import InferenceRequest

from .catalog import Target
from .chat_template import normalize_messages, render_chat
from .errors import sse_error
from .openai_api import Kind, OpenAIRequest, Shapes, parse_request
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


async def chat_completions(request: Request) -> Response:
    return await _complete(request, "chat")


async def completions(request: Request) -> Response:
    return await _complete(request, "completion")


@dataclass(eq=False)
class _Record:
    """One request's outcome for the metrics, filled in as the stream goes."""

    state: QueenState
    route: str
    model: str
    started: float
    node: str = "-"
    outcome: str = "disconnected"
    tokens: int = 0
    first_token: bool = False

    def token(self) -> None:
        if not self.first_token:
            self.first_token = True
            self.state.metrics.ttft.labels(self.model, self.node).observe(time.perf_counter() - self.started)

    def error(self, code: str) -> None:
        self.outcome = "error"
        self.state.metrics.errors.labels(code).inc()

    def commit(self) -> None:
        metrics = self.state.metrics
        metrics.requests.labels(self.route, self.model, self.node, self.outcome).inc()
        if self.tokens:
            metrics.tokens.labels(self.model, self.node).inc(self.tokens)


async def _complete(request: Request, kind: Kind) -> Response:
    state = _state(request)
    record = _Record(state, ROUTE_NAMES[kind], "-", time.perf_counter())
    try:
        parsed = parse_request(kind, await read_json(request))
        target = await state.catalog.resolve(parsed.model)
        record.model = target.model
        infer = _inference(parsed, target)
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
        upstream = await state.relay.open(target, infer, request_id)
    except RbeeError as exc:
        record.error(exc.code)
        record.commit()
        raise
    record.node = upstream.worker.node
    return RelayResponse(_stream(upstream, shapes, record), upstream, record.commit, headers)


def _inference(parsed: OpenAIRequest, target: Target) -> InferenceRequest:
    if parsed.kind == "completion":
        assert parsed.prompt is not None
        return parsed.inference(parsed.prompt)
    entry = target.entry
    rendered = render_chat(
        normalize_messages(parsed.messages),
        entry.chat_template,
        bos_token=entry.bos_token,
        eos_token=entry.eos_token,
    )
    return parsed.inference(rendered.prompt, rendered.extra_stop)


async def _stream(upstream: Upstream, shapes: Shapes, record: _Record) -> AsyncIterator[bytes]:
    """OpenAI chunks, one write per batch of worker events (each token still its own chunk)."""
    first = shapes.first_chunk()
    if first is not None:
        yield first
    count = 0
    async for batch in upstream.batches():
        out: list[bytes] = []
        for _raw, event in batch:
            if event.name == events.TOKEN:
                record.token()
                count += 1
                out.append(shapes.text_chunk(event.data["t"]))
            elif event.name == events.END:
                record.tokens = int(event.data.get("tokens_out", count))
                stop_reason = event.data.get("stop_reason", events.STOP_EOS)
                if stop_reason == events.STOP_CANCELLED:
                    record.error(ErrorCode.REQUEST_CANCELED)
                    out.append(sse_error(_cancelled()))
                    break
                out.append(shapes.final_chunk(stop_reason))
                if shapes.include_usage:
                    out.append(shapes.usage_chunk(int(event.data.get("prompt_tokens", 0)), record.tokens))
                record.outcome = "ok"
            elif event.name == events.ERROR:
                record.tokens = count
                error = RbeeError(
                    str(event.data.get("code")), str(event.data.get("message")), status=502,
                    details=event.data.get("details"),
                )  # fmt: skip
                record.error(error.code)
                out.append(sse_error(error))
        if out:
            yield b"".join(out)
    yield events.encode_done()


def _cancelled() -> RbeeError:
    return RbeeError(ErrorCode.REQUEST_CANCELED, "the generation was cancelled on the worker")


async def _collect(
    state: QueenState,
    target: Target,
    infer: InferenceRequest,
    request_id: str,
    shapes: Shapes,
    record: _Record,
) -> dict[str, object]:
    """Non-streaming: the client sees nothing until the end, so a worker dying mid-way is retried once."""
    error: RbeeError | None = None
    for attempt in range(2):
        attempt_id = request_id if attempt == 0 else f"{request_id}-{attempt}"
        upstream = await state.relay.open(target, infer, attempt_id)
        record.node = upstream.worker.node
        parts: list[str] = []
        try:
            async for _raw, event in upstream.events():
                if event.name == events.TOKEN:
                    record.token()
                    parts.append(event.data["t"])
                elif event.name == events.END:
                    stop_reason = event.data.get("stop_reason", events.STOP_EOS)
                    if stop_reason == events.STOP_CANCELLED:
                        raise _cancelled()
                    record.tokens = int(event.data.get("tokens_out", len(parts)))
                    record.outcome = "ok"
                    return shapes.completion(
                        "".join(parts), stop_reason, int(event.data.get("prompt_tokens", 0)), record.tokens
                    )
                elif event.name == events.ERROR:
                    error = RbeeError(
                        str(event.data.get("code")), str(event.data.get("message")), status=502,
                        details=event.data.get("details"),
                    )  # fmt: skip
        finally:
            await upstream.aclose()
        if error is None or error.code != ErrorCode.WORKER_CRASHED:
            break
    assert error is not None
    raise error
