"""Many clients, few slots: everything completes or is refused cleanly, and nothing gets mixed up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from rbee_control.queen import QueenSettings
from rbee_control.queen.router import RouterSettings
from rbee_worker.protocol.events import iter_events

from ..worker_proc import WorkerProcess
from .conftest import Queen, serve_queen, start_worker

N = 16
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def one_slot_workers(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[list[WorkerProcess]]:
    """The same model on two one-slot workers with a one-request queue each."""
    log_dir = tmp_path_factory.mktemp("concurrency")
    workers: list[WorkerProcess] = []
    try:
        for name in ("alpha", "alpha-copy"):
            workers.append(start_worker(model_files[name], log_dir, slots=1, queue=1, ctx=2048))
        yield workers
    finally:
        for worker in workers:
            worker.kill()


@pytest.fixture(scope="module")
def expected(one_slot_workers: list[WorkerProcess]) -> dict[int, str]:
    """What the model says for each seed, asked directly and one at a time."""

    async def ask_all() -> dict[int, str]:
        out: dict[int, str] = {}
        async with one_slot_workers[0].async_client() as client:
            for seed in range(N):
                body = {"prompt": "the bee", "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed}
                async with client.stream("POST", "/v1/inference", json=body) as response:
                    events = [e async for e in iter_events(response.aiter_bytes())]
                out[seed] = "".join(e.data["t"] for e in events if e.name == "token")
        return out

    return asyncio.run(ask_all())


async def _register(queen: Queen, workers: list[WorkerProcess]) -> None:
    for index, worker in enumerate(workers):
        await queen.register(worker, "alpha", node=f"n{index}")


async def _stream(client: openai.AsyncOpenAI, seed: int) -> str | int:
    """The streamed text, or the HTTP status of a refusal."""
    try:
        stream = await client.completions.create(
            model="alpha", prompt="the bee", max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])
    except openai.APIStatusError as exc:
        return exc.status_code


async def test_sixteen_streams_on_two_one_slot_workers_all_complete_unmixed(
    one_slot_workers: list[WorkerProcess], expected: dict[int, str]
) -> None:
    async with serve_queen() as queen:
        await _register(queen, one_slot_workers)
        client = queen.openai()
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(_stream(client, seed) for seed in range(N)))
        assert results == [expected[seed] for seed in range(N)]
        async with queen.admin() as http:
            listed = (await http.get("/v2/workers/list")).json()["workers"]
        assert all(w["served"] > 0 and w["in_flight"] == 0 for w in listed), listed


async def test_beyond_the_queue_clients_get_a_clean_503_with_retry_after(
    one_slot_workers: list[WorkerProcess], expected: dict[int, str]
) -> None:
    settings = QueenSettings(router=RouterSettings(queue_limit=2, queue_timeout=30))
    async with serve_queen(settings=settings) as queen:
        await _register(queen, one_slot_workers)
        client = queen.openai()
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(_stream(client, seed) for seed in range(N)))
        done = {seed: r for seed, r in enumerate(results) if isinstance(r, str)}
        refused = [r for r in results if not isinstance(r, str)]
        assert len(done) >= 4 and refused and set(refused) == {503}
        assert all(text == expected[seed] for seed, text in done.items())
        async with queen.http() as http:
            busy = await asyncio.gather(
                *(http.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 400})
                  for _ in range(8))
            )  # fmt: skip
        refusals = [r for r in busy if r.status_code == 503]
        assert refusals, [r.status_code for r in busy]
        assert all(int(r.headers["retry-after"]) >= 1 for r in refusals)
        assert all(r.json()["error"]["code"] == "ALL_SLOTS_BUSY" for r in refusals)
