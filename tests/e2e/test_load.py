"""Load through the queen: many concurrent streamed chat requests, every one accounted for.

CI: 64 concurrent clients, one request each, on three one-slot workers (one per node)
behind a queen whose queue holds 24, so the burst meets both the queue and clean refusals;
a refused client retries as `Retry-After` says, at most 3 times. `--soak`: the 64 clients
stream back to back for 2 minutes. Every request ends within its timeout (a request still
running after it is a hang) as completed, rejected (refused cleanly, 503/429 with
`Retry-After`, on every attempt) or failed; a sample of completed streams is compared with
the same seeded request sent straight to a worker, so a stream mixed up with another shows.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import openai

from rbee_control.queen.openai_api import parse_request

from ..waiting import wait_for
from .conftest import MODEL, E2EFleet, Queen, worker_stream

CATEGORY = "load"
#: a short queue, so that a burst of 64 meets the "reject cleanly" path as well as the queue
QUEEN_ARGS = ("--queue-limit", "24", "--queue-timeout", "20")
CLIENTS = 64
MAX_TOKENS = 24
REQUEST_TIMEOUT = 30.0
ATTEMPTS = 3
SOAK_SECONDS = 120.0


@dataclass
class Tally:
    completed: int = 0
    #: requests that were still refused after ATTEMPTS tries (each refusal clean: 503/429 + Retry-After)
    rejected: int = 0
    #: clean refusals seen in all, retried or not
    busy_answers: int = 0
    failed: int = 0
    hangs: int = 0
    tokens: int = 0
    texts: dict[int, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    retry_after: list[float] = field(default_factory=list)
    finish: Counter[str] = field(default_factory=Counter)


def _body(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}: tell me about the hive"}],
        "max_tokens": MAX_TOKENS,
        "seed": i,
        "temperature": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _one(client: openai.AsyncOpenAI, i: int, tally: Tally) -> float | None:
    """One streamed request: None when it ended (completed, failed or hung), else the Retry-After."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            try:
                stream = await client.chat.completions.create(**_body(i))
                parts: list[str] = []
                async for chunk in stream:
                    for choice in chunk.choices:
                        parts.append(choice.delta.content or "")
                        if choice.finish_reason:
                            tally.finish[choice.finish_reason] += 1
                    if chunk.usage is not None:
                        tally.tokens += chunk.usage.completion_tokens
            except openai.APIStatusError as exc:
                retry_after = exc.response.headers.get("retry-after")
                code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
                if exc.status_code in (429, 503) and retry_after and code == "ALL_SLOTS_BUSY":
                    tally.busy_answers += 1
                    tally.retry_after.append(float(retry_after))
                    return float(retry_after)
                tally.failed += 1
                tally.failures.append(f"#{i}: {exc.status_code} {exc.body}")
                return None
            except openai.APIError as exc:
                tally.failed += 1
                tally.failures.append(f"#{i}: {type(exc).__name__}: {exc}")
                return None
    except TimeoutError:
        tally.hangs += 1
        tally.failures.append(f"#{i}: no end within {REQUEST_TIMEOUT}s")
        return None
    tally.completed += 1
    tally.texts[i] = "".join(parts)
    return None


async def _client(client: openai.AsyncOpenAI, i: int, tally: Tally) -> None:
    """One client's request, retried after each clean refusal as its Retry-After says, ATTEMPTS times."""
    for _attempt in range(ATTEMPTS):
        wait = await _one(client, i, tally)
        if wait is None:
            return
        await asyncio.sleep(min(wait, 5.0))
    tally.rejected += 1


async def _burst(queen: Queen, tally: Tally) -> None:
    client = queen.client(timeout=REQUEST_TIMEOUT + 5)
    async with client:
        await asyncio.gather(*(_client(client, i, tally) for i in range(CLIENTS)))


async def _soak(queen: Queen, tally: Tally, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def loop() -> None:
        while time.monotonic() < deadline:
            await _client(client, next(counter), tally)

    client = queen.client(timeout=REQUEST_TIMEOUT + 5)
    async with client:
        await asyncio.gather(*(loop() for _ in range(CLIENTS)))


async def _warm_every_node(queen: Queen, fleet: E2EFleet) -> None:
    """Pin one tiny request to each node, so each has a one-slot worker before the burst."""
    async with queen.client() as client:
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=f"{node}/{MODEL}", messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
                for node in fleet.nodes
            )
        )
    assert all(r.choices[0].finish_reason == "length" for r in replies)


def _direct(fleet: E2EFleet, worker: dict[str, Any], i: int) -> str:
    """The same chat request, as the queen sends it, sent straight to a worker."""
    body = _body(i)
    parsed = parse_request("chat", {**body, "stream": False, "stream_options": None})
    request = parsed.inference().to_json()
    result = worker_stream(fleet.worker_record(worker["id"]), request)
    assert result["error"] is None and result["end"]["stop_reason"] == "max_tokens", result
    return str(result["text"])


def test_concurrent_streams_through_the_queen(e2e: E2EFleet, queen: Queen, soak: bool, record: Any) -> None:
    asyncio.run(_warm_every_node(queen, e2e))
    workers = queen.workers()
    assert sorted(w["node"] for w in workers) == sorted(e2e.nodes), workers
    served_before = {w["id"]: w["served"] for w in workers}

    tally = Tally()
    started = time.monotonic()
    if soak:
        asyncio.run(_soak(queen, tally, SOAK_SECONDS))
    else:
        asyncio.run(_burst(queen, tally))
    seconds = time.monotonic() - started

    total = tally.completed + tally.rejected + tally.failed + tally.hangs  # requests, not attempts

    # the queen releases a request's lease a moment after its client saw the end
    def settled() -> list[dict[str, Any]] | None:
        workers = queen.workers()
        return workers if all(w["in_flight"] == 0 for w in workers) else None

    after = wait_for(settled, 10, "nothing in flight in the queen")
    served = {w["node"]: w["served"] - served_before.get(w["id"], 0) for w in after}
    record(
        requests=total, completed=tally.completed, rejected=tally.rejected, failed=tally.failed,
        hangs=tally.hangs, busy_answers=tally.busy_answers, tokens=tally.tokens, seconds=round(seconds, 1),
        per_node="/".join(str(served.get(n, 0)) for n in sorted(e2e.nodes)),
    )  # fmt: skip
    assert tally.hangs == 0, tally.failures
    assert tally.failed == 0, tally.failures
    assert tally.completed > 0
    if not soak:
        assert total == CLIENTS  # how long it took is recorded above, not asserted: CI is a busy machine
    assert tally.finish["length"] == tally.completed, tally.finish
    assert tally.tokens == tally.completed * MAX_TOKENS
    assert all(r > 0 for r in tally.retry_after)

    # the queen's table is as it was: the same three workers (nothing in flight, waited for above)
    assert sorted(w["id"] for w in after) == sorted(served_before)
    assert sum(served.values()) == tally.completed

    # no stream was mixed up with another: a sample against direct seeded runs on a worker
    sample = sorted(tally.texts)[:: max(1, len(tally.texts) // 4)][:4]
    for i in sample:
        worker = after[i % len(after)]
        assert tally.texts[i] == _direct(e2e, worker, i), f"stream #{i} differs from a direct run"
    # identical texts for different requests: a mix-up, unless each one is what its own direct run gives
    # (with ~15,000 short samples from the tiny model, two can coincide)
    by_text: dict[str, list[int]] = {}
    for i, text in tally.texts.items():
        by_text.setdefault(text, []).append(i)
    collisions = [ids for ids in by_text.values() if len(ids) > 1][:5]
    for ids in collisions:
        for i in ids:
            direct = _direct(e2e, after[i % len(after)], i)
            assert tally.texts[i] == direct, f"streams {ids} are identical and #{i} differs from a direct run"
    if collisions:
        record(identical_but_genuine=sum(len(ids) for ids in collisions))
