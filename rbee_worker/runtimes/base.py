"""The interface every GGUF runtime implements for the worker.

A runtime is deliberately low level — tokenize, sample one token at a time, turn
a token into bytes — so that cancellation, stop strings, UTF-8 hold-back and
metrics live once in the worker instead of once per runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..engine.sequence import TokenSink

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: GBNF text with a `root` rule
    grammar: str | None = None
    #: None: no log-probabilities; n: the chosen token's and the n most likely
    top_logprobs: int | None = None


class Runtime(Protocol):
    """One loaded model instance, driven from one thread at a time.

    ctransformers cannot batch, so each of its slots owns one; llama-cpp slots are
    seats of one shared model (`SequenceRunner`).
    """

    name: str
    #: Request fields beyond temperature/top-p/top-k/seed/stop this runtime honours; the worker
    #: refuses the others with a 400 naming the runtime instead of ignoring them.
    features: frozenset[str]

    @property
    def context_length(self) -> int: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids for `text`, with BOS; safe on any Unicode input."""
        ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_eos(self, token: int) -> bool: ...

    def generate(self, prompt_tokens: list[int], params: SamplingParams) -> Iterator[int]:
        """Sample tokens after the prompt, forever; the caller decides when to stop."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SequenceRunner(Protocol):
    """A runtime whose sequences share one model with others (the batching engine's seats).

    Instead of a token iterator it pushes each token to `sink` from the engine's
    thread and returns when the sequence has ended and its memory is free.
    """

    def run_sequence(self, prompt_tokens: list[int], params: SamplingParams, sink: TokenSink) -> None: ...


@runtime_checkable
class GrammarRuntime(Protocol):
    """A runtime that constrains output with llama.cpp grammars (and knows its vocabulary's size)."""

    @property
    def vocab_size(self) -> int: ...

    def grammar_for(self, grammar: str | None, json_schema: dict[str, Any] | None) -> str | None:
        """The checked GBNF for a request's grammar or JSON schema; a 400 naming the field if unusable."""
        ...


class RuntimeFactory(Protocol):
    def __call__(
        self, path: str, *, context_length: int, threads: int | None, progress: ProgressCallback
    ) -> Runtime: ...
