"""One generation through the relay, in no client format: what the OpenAI and Ollama routes share.

A route parses its own wire format into an `OpenAIRequest` (the queen's request
type), resolves the model, and then either streams — `outputs()` turns the
worker's event batches into text pieces, one `Finished` or one `RbeeError` — or
waits for the whole answer with `collect()`, which retries once from scratch
when a worker dies mid-way (the client has seen nothing yet). Both fill a
`RequestRecord`, so the metrics read the same whichever API a client speaks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rbee_worker.protocol import events
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.request import InferenceRequest

from .catalog import Target
from .openai_api import OpenAIRequest
from .recent import RecentSeen
from .relay import Upstream
from .state import QueenState


@dataclass(eq=False)
class RequestRecord:
    """One request's outcome for the metrics, filled in as the stream goes."""

    state: QueenState
    route: str
    model: str
    started: float
    node: str = "-"
    outcome: str = "disconnected"
    tokens: int = 0
    first_token: bool = False
    #: `perf_counter()` when a worker's stream committed: what came before was queueing or a cold start.
    committed: float = 0.0
    #: for the recent-requests ring: which worker ran it, its decode time, the first token's delay
    worker: str = "-"
    decode_ms: float = 0.0
    ttft: float | None = None
    error_code: str | None = None

    def token(self) -> None:
        if not self.first_token:
            self.first_token = True
            self.ttft = time.perf_counter() - self.started
            self.state.metrics.ttft.labels(self.model, self.node).observe(self.ttft)

    def error(self, code: str) -> None:
        self.outcome = "error"
        self.error_code = code
        self.state.metrics.errors.labels(code).inc()

    def finished(self, upstream: Upstream, finished: Finished) -> None:
        self.worker = upstream.worker.id
        self.tokens = finished.tokens_out
        self.decode_ms = finished.decode_ms

    def commit(self) -> None:
        metrics = self.state.metrics
        metrics.requests.labels(self.route, self.model, self.node, self.outcome).inc()
        if self.tokens:
            metrics.tokens.labels(self.model, self.node).inc(self.tokens)
        seen = RecentSeen(self.tokens, self.decode_ms, self.ttft, self.error_code)
        recent = self.state.recent
        recent.add(
            seen.request(
                recent.next_seq(), self.route, self.model, self.node, self.worker, self.outcome, self.started
            )
        )


@dataclass(frozen=True, slots=True)
class Finished:
    """The worker's `end` event: why it stopped, token counts, and its own timings."""

    stop_reason: str
    prompt_tokens: int
    tokens_out: int
    ttft_ms: float = 0.0
    decode_ms: float = 0.0

    @classmethod
    def from_event(cls, data: dict[str, Any], counted: int) -> Finished:
        return cls(
            stop_reason=str(data.get("stop_reason", events.STOP_EOS)),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            tokens_out=int(data.get("tokens_out", counted)),
            ttft_ms=float(data.get("ttft_ms", 0.0)),
            decode_ms=float(data.get("decode_ms", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class Piece:
    """A token's text with its log-probabilities (the worker's `lp`), when the request asked for them."""

    text: str
    logprobs: list[dict[str, Any]]


#: What `outputs()` yields per worker batch: token texts, then at most one `Finished` or `RbeeError`.
Output = str | Piece | Finished | RbeeError


def worker_request(parsed: OpenAIRequest, target: Target) -> InferenceRequest:
    """The worker body: a completion's prompt as it is; chat messages, which the worker renders
    (with the template the catalog knows, such as a registration's, when there is one)."""
    if parsed.kind == "completion":
        return parsed.inference()
    return parsed.inference(target.entry.chat_template)


def cancelled_error() -> RbeeError:
    return RbeeError(ErrorCode.REQUEST_CANCELED, "the generation was cancelled on the worker", status=503)


def _event_error(data: dict[str, Any]) -> RbeeError:
    return RbeeError(str(data.get("code")), str(data.get("message")), status=502, details=data.get("details"))


async def outputs(upstream: Upstream, record: RequestRecord) -> AsyncIterator[list[Output]]:
    """One list per worker batch (each token its own piece), so a route writes once per network read."""
    count = 0
    record.worker = upstream.worker.id
    async for batch in upstream.batches():
        out: list[Output] = []
        for _raw, event in batch:
            if event.name == events.TOKEN:
                record.token()
                count += 1
                lp = event.data.get("lp")
                out.append(event.data["t"] if lp is None else Piece(event.data["t"], lp))
            elif event.name == events.END:
                finished = Finished.from_event(event.data, count)
                record.finished(upstream, finished)
                if finished.stop_reason == events.STOP_CANCELLED:
                    record.error(ErrorCode.REQUEST_CANCELED)
                    out.append(cancelled_error())
                    break
                record.outcome = "ok"
                out.append(finished)
            elif event.name == events.ERROR:
                record.tokens = count
                error = _event_error(event.data)
                record.error(error.code)
                out.append(error)
        if out:
            yield out


async def collect(
    state: QueenState,
    target: Target,
    infer: InferenceRequest,
    request_id: str,
    record: RequestRecord,
    logprobs: list[dict[str, Any]] | None = None,
) -> tuple[str, Finished]:
    """Non-streaming: the client sees nothing until the end, so a worker dying mid-way is retried once.

    Log-probabilities, when asked for, are appended to `logprobs`."""
    error: RbeeError | None = None
    for attempt in range(2):
        attempt_id = request_id if attempt == 0 else f"{request_id}-{attempt}"
        upstream = await state.relay.open(target, infer, attempt_id)
        record.node, record.worker = upstream.worker.node, upstream.worker.id
        record.committed = time.perf_counter()
        parts: list[str] = []
        if logprobs is not None:
            logprobs.clear()
        try:
            async for _raw, event in upstream.events():
                if event.name == events.TOKEN:
                    record.token()
                    parts.append(event.data["t"])
                    if logprobs is not None:
                        logprobs.extend(event.data.get("lp") or [])
                elif event.name == events.END:
                    finished = Finished.from_event(event.data, len(parts))
                    if finished.stop_reason == events.STOP_CANCELLED:
                        raise cancelled_error()
                    record.finished(upstream, finished)
                    record.outcome = "ok"
                    return "".join(parts), finished
                elif event.name == events.ERROR:
                    error = _event_error(event.data)
        finally:
            await upstream.aclose()
        if error is None or error.code != ErrorCode.WORKER_CRASHED:
            break
    assert error is not None
    raise error
