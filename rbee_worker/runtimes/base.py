"""The interface every GGUF runtime implements for the worker.

A runtime is deliberately low level — tokenize, sample one token at a time, turn
a token into bytes — so that cancellation, stop strings, UTF-8 hold-back and
metrics live once in the worker instead of once per runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..engine.sequence import TokenSink

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None


class Runtime(Protocol):
    """One loaded model instance, driven from one thread at a time.

    ctransformers cannot batch, so each of its slots owns one; llama-cpp slots are
    seats of one shared model (`SequenceRunner`).
    """

    name: str

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


class RuntimeFactory(Protocol):
    def __call__(
        self, path: str, *, context_length: int, threads: int | None, progress: ProgressCallback
    ) -> Runtime: ...
