"""llama-cpp-python, the default runtime: one model copy serves every slot (the batching engine).

The runtime loads the weights once and starts a scheduler with one KV sequence
per slot; each slot drives its sequence through a `LlamaCppSeat`. Only
llama-cpp-python's low-level C bindings are used (the high-level `Llama` class
only ever decodes sequence 0).
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from typing import Any

from ..engine import Model, Scheduler, TokenSink
from ..engine.grammar import GrammarError, check_grammar, schema_grammar
from ..engine.sampling import SamplerChain, SamplerSettings
from ..protocol.constraints import FIELDS
from ..protocol.wire import invalid
from .base import ProgressCallback, SamplingParams

NAME = "llama-cpp"
FEATURES = FIELDS

#: Seconds between checks that an in-process `generate` has not failed.
_POLL_S = 0.1


class LlamaCppRuntime:
    name = NAME
    features = FEATURES

    def __init__(
        self,
        path: str,
        *,
        context_length: int,
        threads: int | None,
        progress: ProgressCallback,
        sequences: int = 1,
        gpu_layers: int = 0,
        main_gpu: int = 0,
        rpc_servers: tuple[str, ...] = (),
        tensor_split: tuple[float, ...] = (),
        cache_type: str = "f16",
    ) -> None:
        progress(0.0)
        if rpc_servers:  # before the load: the servers become devices it can place layers on
            from .rpc_devices import register

            register(list(rpc_servers))
        self._model = Model(
            path,
            gpu_layers=gpu_layers,
            main_gpu=main_gpu,
            tensor_split=list(tensor_split) or None,
            progress=progress,
        )
        try:
            self._scheduler = Scheduler(
                self._model,
                sequences=sequences,
                context_per_sequence=context_length,
                threads=threads or max(1, (os.cpu_count() or 2) // 2),
                cache_type=cache_type,
            )
        except BaseException:
            self._model.close()
            raise
        progress(1.0)

    @property
    def context_length(self) -> int:
        """Tokens one sequence may hold (prompt and output)."""
        return self._scheduler.context_per_sequence

    @property
    def sequences(self) -> int:
        return self._scheduler.sequences

    @property
    def training_context(self) -> int:
        return self._model.training_context

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text)

    def token_bytes(self, token: int) -> bytes:
        return self._model.token_bytes(token)

    def is_eos(self, token: int) -> bool:
        return self._model.is_eos(token)

    @property
    def vocab_size(self) -> int:
        return self._model.vocab_size

    def grammar_for(self, grammar: str | None, json_schema: dict[str, Any] | None) -> str | None:
        """The GBNF a request constrains its output with, checked by llama.cpp; a 400 naming the field."""
        field_name = "json_schema" if json_schema is not None else "grammar"
        try:
            if json_schema is not None:
                grammar = schema_grammar(json_schema)
            if grammar is not None:
                check_grammar(self._model.vocab, grammar)
        except GrammarError as exc:
            raise invalid(field_name, str(exc)) from None
        return grammar

    def _sampler(self, params: SamplingParams) -> SamplerChain:
        last_n = params.penalty_last_n if params.penalty_last_n >= 0 else self.context_length
        settings = SamplerSettings(
            params.temperature, params.top_p, params.top_k, params.seed, params.repeat_penalty,
            params.presence_penalty, params.frequency_penalty, last_n, params.logit_bias,
            params.grammar, params.top_logprobs,
        )  # fmt: skip
        return SamplerChain(
            params.temperature,
            params.top_p,
            params.top_k,
            params.seed,
            settings=settings,
            vocab=self._model.vocab,
        )

    def seat(self, index: int) -> LlamaCppSeat:
        """Slot `index`'s handle: this model, KV sequence `index`."""
        if not 0 <= index < self.sequences:
            raise ValueError(f"seat {index} outside 0..{self.sequences - 1}")
        return LlamaCppSeat(self, index)

    def run_sequence(
        self, prompt_tokens: list[int], params: SamplingParams, sink: TokenSink, *, seat: int = 0
    ) -> None:
        sampler = self._sampler(params)
        self._scheduler.run(seat, prompt_tokens, sampler, sink)

    def generate(self, prompt_tokens: list[int], params: SamplingParams, *, seat: int = 0) -> Iterator[int]:
        """Sample on `seat` until the caller stops iterating (for in-process use and tests)."""
        sink = _QueueSink()
        sampler = self._sampler(params)
        handle = self._scheduler.start(seat, prompt_tokens, sampler, sink)
        try:
            while True:
                try:
                    yield sink.tokens.get(timeout=_POLL_S)
                except queue.Empty:
                    if handle.done.is_set():
                        self._scheduler.wait(handle)
                        return
        finally:
            sink.stopped = True
            handle.done.wait()

    def close(self) -> None:
        self._scheduler.close()
        self._model.close()


class LlamaCppSeat:
    """One slot's view of a shared `LlamaCppRuntime`: the same weights, its own KV sequence."""

    name = NAME
    features = FEATURES

    def __init__(self, runtime: LlamaCppRuntime, index: int) -> None:
        self.runtime = runtime
        self.index = index

    @property
    def context_length(self) -> int:
        return self.runtime.context_length

    def tokenize(self, text: str) -> list[int]:
        return self.runtime.tokenize(text)

    def token_bytes(self, token: int) -> bytes:
        return self.runtime.token_bytes(token)

    def is_eos(self, token: int) -> bool:
        return self.runtime.is_eos(token)

    @property
    def vocab_size(self) -> int:
        return self.runtime.vocab_size

    def grammar_for(self, grammar: str | None, json_schema: dict[str, Any] | None) -> str | None:
        return self.runtime.grammar_for(grammar, json_schema)

    def run_sequence(self, prompt_tokens: list[int], params: SamplingParams, sink: TokenSink) -> None:
        self.runtime.run_sequence(prompt_tokens, params, sink, seat=self.index)

    def generate(self, prompt_tokens: list[int], params: SamplingParams) -> Iterator[int]:
        return self.runtime.generate(prompt_tokens, params, seat=self.index)

    def close(self) -> None:
        """Nothing of its own: the shared runtime is closed by whoever loaded it."""


class _QueueSink:
    def __init__(self) -> None:
        self.tokens: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.stopped = False

    @property
    def cancelled(self) -> bool:
        return self.stopped

    def on_token(self, token: int) -> bool:
        self.tokens.put(token)
        return not self.stopped
