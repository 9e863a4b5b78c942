"""The last requests the queen finished, in a bounded ring: what the dashboard lists.

Only what describes a request's fate is kept — route, model, where it ran, outcome,
token count and timings — never a prompt or an answer: the ring is readable by the
admin key, and what clients write is theirs. The ring has a fixed size, so a busy
queen holds the same memory as an idle one.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

#: How many finished requests the queen remembers.
RECENT_SIZE = 200


@dataclass(frozen=True, slots=True)
class RecentRequest:
    """One finished request: `outcome` is ok, error or disconnected; durations in milliseconds."""

    seq: int
    at: float
    route: str
    model: str
    node: str
    worker: str
    outcome: str
    tokens: int
    duration_ms: float
    ttft_ms: float | None
    #: generation speed on the worker (decode time only), None when nothing was generated
    tokens_per_s: float | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tokens_per_second(tokens: int, decode_ms: float) -> float | None:
    if tokens <= 0 or decode_ms <= 0:
        return None
    return round(tokens * 1000.0 / decode_ms, 2)


@dataclass(slots=True)
class RecentSeen:
    """What a relayed stream showed of itself, filled in as its events pass (the native route)."""

    tokens: int = 0
    decode_ms: float = 0.0
    ttft: float | None = None
    error: str | None = None

    def request(
        self, seq: int, route: str, model: str, node: str, worker: str, outcome: str, started: float
    ) -> RecentRequest:
        """The finished request; `started` is the `perf_counter()` it began at."""
        return RecentRequest(
            seq=seq,
            at=time.time(),
            route=route,
            model=model,
            node=node,
            worker=worker,
            outcome=outcome,
            tokens=self.tokens,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            ttft_ms=None if self.ttft is None else round(self.ttft * 1000, 1),
            tokens_per_s=tokens_per_second(self.tokens, self.decode_ms),
            error=self.error,
        )


class RecentRequests:
    """A ring of the last `size` requests, newest last; `seq` numbers them for clients that poll."""

    def __init__(self, size: int = RECENT_SIZE) -> None:
        if size < 1:
            raise ValueError("the ring holds at least one request")
        self._ring: deque[RecentRequest] = deque(maxlen=size)
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self._ring)

    def next_seq(self) -> int:
        return next(self._seq)

    def add(self, request: RecentRequest) -> None:
        self._ring.append(request)

    def latest(self, limit: int | None = None) -> list[RecentRequest]:
        """Newest first, at most `limit`."""
        items = list(reversed(self._ring))
        return items if limit is None else items[: max(0, limit)]

    def worker_rate(self, worker: str) -> float | None:
        """The generation speed of `worker`'s most recent request that generated anything."""
        for request in reversed(self._ring):
            if request.worker == worker and request.tokens_per_s is not None:
                return request.tokens_per_s
        return None
