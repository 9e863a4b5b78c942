"""One request's generation: runtime tokens in, text pieces out to asyncio.

The blocking runtime runs on the slot's thread (or, for the batching engine, on
the scheduler's thread) and never waits for the client: each finished piece is
handed to the event loop with `call_soon_threadsafe`, so tokens/s through HTTP
is the runtime's own rate. `on_token` is the one place that applies EOS, the
token budget, UTF-8 hold-back and stop strings, whichever path produced the
token. Cancellation is a flag checked between tokens, so a DELETE or a
disconnect stops the runtime within one token.
"""

from __future__ import annotations

import asyncio
import codecs
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol import events
from ..protocol.errors import ErrorCode, RbeeError
from ..protocol.request import InferenceRequest
from ..runtimes import Runtime, SamplingParams, SequenceRunner

if TYPE_CHECKING:
    from ..engine.sampling import TokenLogprob


@dataclass(slots=True)
class GenerationStats:
    tokens_out: int = 0
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    stop_reason: str = events.STOP_MAX_TOKENS
    last_token_at: float = 0.0

    def end_payload(self) -> dict[str, object]:
        return {
            "tokens_out": self.tokens_out,
            "prompt_tokens": self.prompt_tokens,
            "decode_ms": round(self.decode_ms, 3),
            "ttft_ms": round(self.ttft_ms, 3),
            "stop_reason": self.stop_reason,
        }


class StopMatcher:
    """Holds back text that might be the start of a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop sequence was hit)."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [(self._pending.find(s), s) for s in self._stops if s in self._pending]
        if hits:
            cut = min(pos for pos, _ in hits)
            out, self._pending = self._pending[:cut], ""
            return out, True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        split = len(self._pending) - keep
        out, self._pending = self._pending[:split], self._pending[split:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


_FINISHED = object()

#: Tokens produced faster than this interval share one socket write (each keeps its own
#: SSE event). Waking the event loop and writing once per token costs ~60 µs of GIL time
#: that a 3,000 tokens/s runtime feels; a token after a pause is still written at once.
WRITE_INTERVAL_S = 0.002


@dataclass(eq=False)
class Generation:
    """A running generation; iterate `batches()` for text, then read `stats`."""

    request_id: str
    request: InferenceRequest
    runtime: Runtime
    stats: GenerationStats = field(default_factory=GenerationStats)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _pending: deque[object] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _wake_scheduled: bool = False
    _error: RbeeError | None = None
    # Per-token state, set up by _begin and used by on_token from the runtime's (or engine's) thread.
    _started: float = 0.0
    _first_at: float = 0.0
    _budget: int = 0
    _stopped: bool = False
    _decoder: codecs.IncrementalDecoder = field(init=False)
    _stops: StopMatcher = field(init=False)
    #: Log-probabilities of tokens whose text has not been sent yet (held back or incomplete UTF-8).
    _logprobs: list[dict[str, Any]] = field(default_factory=list)

    def start(self, run_on_thread: Callable[[Callable[[], None]], object]) -> None:
        self._loop = asyncio.get_running_loop()
        run_on_thread(self._run)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, item: object) -> None:
        """Runtime thread: queue a piece; wake the loop only if no wake-up is on its way."""
        self._pending.append(item)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._loop.call_soon_threadsafe(self._ready.set)

    async def batches(self) -> AsyncIterator[list[tuple[str, int, list[dict[str, Any]] | None]]]:
        """Lists of (text, index of its last token, log-probabilities of its tokens when asked for);
        raises the runtime's error at the end."""
        next_write = 0.0
        while True:
            await self._ready.wait()
            delay = next_write - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # Clear before draining: a piece appended after this point schedules a new wake-up.
            self._ready.clear()
            self._wake_scheduled = False
            items = [self._pending.popleft() for _ in range(len(self._pending))]
            finished = bool(items) and items[-1] is _FINISHED
            batch = [item for item in items if item is not _FINISHED]
            if batch:
                yield batch  # type: ignore[misc]
                next_write = self._loop.time() + WRITE_INTERVAL_S
            if finished:
                if self._error is not None:
                    raise self._error
                return

    def _run(self) -> None:
        try:
            self._generate()
        except RbeeError as exc:
            self._error = exc
        except Exception as exc:
            self._error = RbeeError(ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}", status=500)
        finally:
            self._put(_FINISHED)

    def _generate(self) -> None:
        runtime = self.runtime
        prompt_tokens = self._begin()
        req = self.request
        c = req.constraints
        params = SamplingParams(
            req.temperature, req.top_p, req.top_k, req.seed, c.repeat_penalty, c.presence_penalty,
            c.frequency_penalty, c.penalty_last_n, c.logit_bias, c.grammar,
            c.top_logprobs if c.logprobs else None,
        )  # fmt: skip
        if isinstance(runtime, SequenceRunner):
            # The batching engine calls on_token from its own thread and returns at the end.
            runtime.run_sequence(prompt_tokens, params, self)
        else:
            for token in runtime.generate(prompt_tokens, params):
                if not self.on_token(token):
                    break
        self._end()

    def _begin(self) -> list[int]:
        """Tokenize the prompt and set the token budget: what is left of the context, at most max_tokens."""
        req, runtime, stats = self.request, self.runtime, self.stats
        self._started = time.perf_counter()
        prompt_tokens = runtime.tokenize(req.prompt)
        stats.prompt_tokens = len(prompt_tokens)
        room = runtime.context_length - len(prompt_tokens)
        if room <= 0:
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                f"prompt: {len(prompt_tokens)} tokens do not fit the {runtime.context_length}-token context",
                status=400,
                details={"field": "prompt"},
            )
        self._budget = min(req.max_tokens, room)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(req.stop)
        return prompt_tokens

    def on_logprob(self, logprob: TokenLogprob) -> None:
        """The engine's log-probabilities for the token `on_token` gets next (only when asked for)."""
        entry = self._logprob_entry(logprob.token, logprob.logprob)
        entry["top"] = [self._logprob_entry(t, lp) for t, lp in logprob.top]
        self._logprobs.append(entry)

    def _logprob_entry(self, token: int, logprob: float) -> dict[str, Any]:
        data = self.runtime.token_bytes(token)
        return {"token": data.decode(errors="replace"), "bytes": list(data), "logprob": round(logprob, 6)}

    def _take_logprobs(self) -> list[dict[str, Any]] | None:
        if not self.request.constraints.logprobs:
            return None
        taken, self._logprobs = self._logprobs, []
        return taken

    def on_token(self, token: int) -> bool:
        """Take one sampled token; False when the generation is over (the reason is in stats)."""
        stats = self.stats
        if self._cancel.is_set():
            return self._stop(events.STOP_CANCELLED)
        if self.runtime.is_eos(token):
            if self._logprobs:
                self._logprobs.pop()  # the end-of-text token is not part of the answer
            return self._stop(events.STOP_EOS)
        now = time.perf_counter()
        if stats.tokens_out == 0:
            self._first_at = now
            stats.ttft_ms = (now - self._started) * 1000
        stats.tokens_out += 1
        stats.last_token_at = time.time()
        text, hit_stop = self._stops.feed(self._decoder.decode(self.runtime.token_bytes(token)))
        if text:
            self._put((text, stats.tokens_out - 1, self._take_logprobs()))
        if hit_stop:
            return self._stop(events.STOP_STOP)
        if stats.tokens_out >= self._budget:
            return self._stop(events.STOP_MAX_TOKENS)
        return True

    def _stop(self, reason: str) -> bool:
        self.stats.stop_reason = reason
        self._stopped = True
        return False

    def _end(self) -> None:
        """Flush held-back text; an engine may end a cancelled sequence without another token."""
        stats = self.stats
        if not self._stopped and self._cancel.is_set():
            stats.stop_reason = events.STOP_CANCELLED
        if stats.stop_reason != events.STOP_STOP:
            tail = self._stops.flush() + self._decoder.decode(b"", final=True)
            if tail:
                self._put((tail, max(stats.tokens_out - 1, 0), self._take_logprobs()))
        if self._first_at:
            stats.decode_ms = (time.perf_counter() - self._first_at) * 1000
