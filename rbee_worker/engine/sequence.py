"""One request's state inside the scheduler: its prompt, position, sampler and receiver."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .sampling import SamplerChain, TokenLogprob


class TokenSink(Protocol):
    """Who receives a sequence's tokens: the worker's generation for that request."""

    @property
    def cancelled(self) -> bool:
        """Checked every step: a cancelled sequence leaves before its next decode."""
        ...

    def on_token(self, token: int) -> bool:
        """Take one sampled token on the scheduler's thread; False ends the sequence."""
        ...


@runtime_checkable
class LogprobSink(Protocol):
    """A sink that asked for log-probabilities: each arrives just before its token."""

    def on_logprob(self, logprob: TokenLogprob) -> None: ...


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt: list[int]
    sampler: SamplerChain
    sink: TokenSink
    fed: int = 0
    """Prompt tokens already placed in a batch."""
    pos: int = 0
    """Position of the next token to decode."""
    next_token: int | None = None
    """The last sampled token, decoded in the next step."""
    sample_at: int = -1
    """Batch index whose logits this step samples from; -1 while the prompt is still going in."""
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)
