"""Continuous batching through HTTP: one llama-cpp model copy serving several slots at once.

Batched decoding may pick another token than one-at-a-time decoding where two
logits nearly tie, so these tests check properties (lengths, endings, seats
freed, one request's stop or cancel leaving the others alone) rather than
comparing texts with solo runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psutil
import pytest

from rbee_worker.protocol.events import Event

from ..worker_proc import WorkerProcess
from .sse import collect, text_of
from .test_lifecycle import Reader, metric, wait_for_metric

pytestmark = pytest.mark.llama


def token_indices(events: list[Event]) -> list[int]:
    return [e.data["i"] for e in events if e.name == "token"]


def assert_complete(events: list[Event], tokens: int, reason: str = "max_tokens") -> None:
    """One whole stream: started, tokens in order ending at the last one, one end."""
    assert events[0].name == "started" and events[-1].name == "end", [e.name for e in events]
    end = events[-1].data
    assert end["stop_reason"] == reason and end["tokens_out"] == tokens, end
    indices = token_indices(events)
    assert indices == sorted(indices) and len(set(indices)) >= len(indices) - 1
    assert indices and indices[-1] == tokens - 1, indices[-3:]


def batched_worker(worker_factory: type[WorkerProcess], model: Path, **kwargs: Any) -> WorkerProcess:
    worker = worker_factory(model, backend="llama-cpp", **kwargs)
    ready = worker.wait_ready(timeout=120)
    assert ready["runtime"] == "llama-cpp" and ready["slots"] == kwargs.get("slots", 1)
    return worker


async def test_concurrent_streams_each_run_to_their_own_length(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = batched_worker(worker_factory, tiny_model, slots=4, queue=0, ctx=2048)
    lengths = [30, 170, 95, 300]
    bodies = [{"prompt": f"prompt {i} " * (i + 1), "max_tokens": n, "seed": i} for i, n in enumerate(lengths)]
    async with worker.async_client() as client:
        results = await asyncio.gather(*(collect(client, b) for b in bodies))
        assert await metric(client, "rbee_worker_tokens_total") == sum(lengths)
        await wait_for_metric(client, "rbee_worker_slots_busy", 0)
    for events, n in zip(results, lengths, strict=True):
        assert_complete(events, n)
    log = worker.log()
    assert "Traceback" not in log and "SequenceError" not in log, log


async def test_side_by_side_streams_keep_their_own_sampler(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    # Each seat has its own seeded sampler: three seeds side by side give three texts.
    worker = batched_worker(worker_factory, tiny_model, slots=3, queue=0, ctx=2048)
    body = {"prompt": "the hive", "max_tokens": 120, "temperature": 0.9}
    bodies = [{**body, "seed": seed} for seed in (9, 10, 11)]
    async with worker.async_client() as client:
        results = await asyncio.gather(*(collect(client, body) for body in bodies))
    texts = [text_of(events) for events in results]
    assert len(set(texts)) == 3
    for events in results:
        assert_complete(events, 120)


async def test_a_stop_string_ends_only_its_own_stream(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = batched_worker(worker_factory, tiny_model, slots=3, queue=0, ctx=2048)
    base = {"prompt": "a", "max_tokens": 80, "seed": 3}
    async with worker.async_client() as client:
        free = text_of(await collect(client, base))
        # Early in the text: decoded beside others, the stream may drift from this solo run later on.
        stop = next(free[i : i + 2] for i in range(3, len(free) - 2) if "\ufffd" not in free[i : i + 2])
        bodies = [
            {**base, "stop": [stop]},
            {"prompt": "b", "max_tokens": 80, "seed": 4, "stop": ["\x00never"]},
            {"prompt": "c", "max_tokens": 80, "seed": 5},
        ]
        stopped, *others = await asyncio.gather(*(collect(client, b) for b in bodies))
    assert stopped[-1].data["stop_reason"] == "stop"
    assert stop not in text_of(stopped)
    for events in others:
        assert_complete(events, 80)


async def test_cancel_frees_a_seat_for_a_queued_request_while_others_stream_on(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = batched_worker(worker_factory, tiny_model, slots=2, queue=1, ctx=4096)
    endless = {"prompt": "the hive", "max_tokens": 4000, "seed": 1}
    steady = {"prompt": "meadow", "max_tokens": 600, "seed": 2}
    async with worker.async_client() as client:
        async with (
            client.stream("POST", "/v1/inference", json=endless, headers={"X-Request-ID": "gone"}) as a,
            client.stream("POST", "/v1/inference", json=steady) as b,
        ):
            first, second = Reader(a), Reader(b)
            await first.tokens(3)
            await second.tokens(3)
            queued = asyncio.create_task(collect(client, {"prompt": "late", "max_tokens": 40, "seed": 3}))
            await wait_for_metric(client, "rbee_worker_queue_depth", 1)
            gone = a.headers["x-request-id"]  # the worker names the generation
            assert (await client.delete(f"/v1/inference/{gone}")).status_code == 200
            late = await queued
            # The queued request got the freed seat and finished while the other stream runs on.
            assert worker.proc.poll() is None
            cancelled = await first.rest()
            rest = await second.rest()
        assert cancelled[-1].data["stop_reason"] == "cancelled"
        assert cancelled[-1].data["tokens_out"] < endless["max_tokens"] // 2
        assert_complete(late, 40)
        assert rest[-1].data["stop_reason"] == "max_tokens" and rest[-1].data["tokens_out"] == 600
        await wait_for_metric(client, "rbee_worker_slots_busy", 0)


async def test_a_client_gone_mid_stream_frees_its_seat(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = batched_worker(worker_factory, tiny_model, slots=2, queue=0, ctx=16384)
    async with worker.async_client() as client:
        async with client.stream("POST", "/v1/inference", json={"prompt": "x", "max_tokens": 16000}) as r:
            await Reader(r).tokens(3)
        await wait_for_metric(client, "rbee_worker_slots_busy", 0)
        generated = await metric(client, "rbee_worker_tokens_total")
        assert generated < 8000, f"generation ran on after the client left: {generated}"
        both = await asyncio.gather(*(collect(client, {"prompt": p, "max_tokens": 20}) for p in "yz"))
    for events in both:
        assert_complete(events, 20)


async def test_a_prompt_beyond_the_per_slot_context_is_refused(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = batched_worker(worker_factory, tiny_model, slots=2, queue=0, ctx=64)
    async with worker.async_client() as client:
        response = await client.post("/v1/inference", json={"prompt": "word " * 200, "max_tokens": 5})
        events = await collect(client, {"prompt": "short", "max_tokens": 500})
    assert "do not fit the 64-token context" in response.text and "INVALID_REQUEST" in response.text
    end = events[-1].data
    assert end["stop_reason"] == "max_tokens" and end["prompt_tokens"] + end["tokens_out"] == 64


@pytest.mark.slow
async def test_smollm2_streams_side_by_side_in_one_model_copy(
    worker_factory: type[WorkerProcess], smollm2: Path
) -> None:
    prompts = ["The capital of France is", "Bees make honey by", "A short poem about rain:", "1, 2, 3,"]
    lengths = [24, 40, 32, 16]
    one = batched_worker(worker_factory, smollm2, slots=1, ctx=1024, threads=2)
    rss_one = psutil.Process(one.proc.pid).memory_info().rss
    one.kill()
    four = batched_worker(worker_factory, smollm2, slots=4, ctx=1024, threads=2)
    rss_four = psutil.Process(four.proc.pid).memory_info().rss
    async with four.async_client() as client:
        bodies = [
            {"prompt": p, "max_tokens": n, "temperature": 0.0, "stop": ["\x00never"]}
            for p, n in zip(prompts, lengths, strict=True)
        ]
        results = await asyncio.gather(*(collect(client, b) for b in bodies))
    for events, n in zip(results, lengths, strict=True):
        end = events[-1].data
        assert end["stop_reason"] in {"max_tokens", "eos"} and end["tokens_out"] <= n, end
        if end["stop_reason"] == "max_tokens":
            assert_complete(events, n)
    assert "Paris" in text_of(results[0])
    print(f"\nresident after load, ctx 1024 per slot: --slots 1 {rss_one / 2**20:.0f} MiB, "
          f"--slots 4 {rss_four / 2**20:.0f} MiB ({rss_four / rss_one:.2f}x)")  # fmt: skip
    assert rss_four < 2 * rss_one, "four slots must share one copy of the weights"


@pytest.mark.slow
async def test_a_q8_0_cache_holds_four_slots_in_less_memory(
    worker_factory: type[WorkerProcess], smollm2: Path
) -> None:
    """`--cache-type q8_0` (llama-server's -ctk/-ctv q8_0): half the KV bytes, the same greedy answer."""
    rss: dict[str, int] = {}
    answers: dict[str, str] = {}
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0.0}
    for cache in ("f16", "q8_0"):
        worker = batched_worker(worker_factory, smollm2, slots=4, ctx=1024, extra=["--cache-type", cache])
        ready = worker.wait_ready()
        assert ready["cache_type"] == cache, ready
        rss[cache] = psutil.Process(worker.proc.pid).memory_info().rss
        async with worker.async_client() as client:
            answers[cache] = text_of(await collect(client, body))
        worker.kill()
    # SmolLM2's cache for 4 × 1024 cells: 90 MiB at f16, 48 MiB at q8_0 (34 bytes per 32 elements)
    assert rss["f16"] - rss["q8_0"] > 30 * 2**20, rss
    assert "Paris" in answers["q8_0"], answers
