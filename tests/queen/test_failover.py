"""Workers dying and clients leaving: failover before the first token, an error after it, no hangs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import httpx
import openai

from rbee_worker.protocol.client import WorkerClient

from ..worker_proc import WorkerProcess
from .conftest import Queen, metric, serve_queen

LONG = 15_000  # tokens: a few seconds of the tiny model, far more than any test waits for


def _kill9(worker: WorkerProcess) -> None:
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)


async def _workers(queen: Queen) -> list[dict]:
    async with queen.admin() as http:
        return (await http.get("/v2/workers/list")).json()["workers"]


async def _metrics(url: str, headers: dict[str, str]) -> str:
    async with WorkerClient(url, headers["Authorization"].removeprefix("Bearer ")) as client:
        return await client.metrics_text()


async def test_a_worker_killed_before_the_request_is_skipped(
    worker_factory: type[WorkerProcess], model_files: dict[str, Path]
) -> None:
    first, second = (worker_factory(model_files[n], ctx=2048) for n in ("alpha", "alpha-copy"))
    for worker in (first, second):
        worker.wait_ready()
    async with serve_queen() as queen:
        await queen.register(first, "alpha", node="n1")
        await queen.register(second, "alpha", node="n2")
        _kill9(first)
        client = queen.openai()
        async with asyncio.timeout(30):
            for _ in range(3):
                stream = await client.chat.completions.create(
                    model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True
                )
                chunks = [c async for c in stream]
                assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        listed = await _workers(queen)
        assert [w["node"] for w in listed] == ["n2"]
        assert metric(queen.state.metrics.render().decode(), "rbee_queen_retries_total") >= 1


async def test_a_worker_killed_mid_stream_gives_the_client_an_error_not_a_hang(
    worker_factory: type[WorkerProcess], model_files: dict[str, Path]
) -> None:
    workers = [worker_factory(model_files[n], ctx=16384) for n in ("alpha", "alpha-copy")]
    for worker in workers:
        worker.wait_ready()
    async with serve_queen() as queen:
        for index, worker in enumerate(workers):
            await queen.register(worker, "alpha", node=f"n{index}")
        by_url = {w.url: w for w in workers}
        client = queen.openai()
        stream = await client.completions.create(model="alpha", prompt="a", max_tokens=LONG, stream=True)
        received = 0
        async with asyncio.timeout(30):
            try:
                async for _chunk in stream:
                    received += 1
                    if received == 3:
                        busy = [w for w in await _workers(queen) if w["in_flight"]]
                        _kill9(by_url[busy[0]["url"]])
                raise AssertionError("the stream ended normally although its worker was killed")
            except openai.APIError as exc:
                assert isinstance(exc.body, dict) and exc.body["code"] == "WORKER_CRASHED"
        # the survivor still serves, and the dead worker has left the table
        async with asyncio.timeout(30):
            again = await client.completions.create(model="alpha", prompt="a", max_tokens=8)
            assert again.choices[0].text is not None
            while len(await _workers(queen)) != 1:
                await asyncio.sleep(0.05)


async def test_client_disconnect_stops_the_generation_on_the_worker(
    worker_factory: type[WorkerProcess], model_files: dict[str, Path]
) -> None:
    worker = worker_factory(model_files["alpha"], ctx=16384)
    worker.wait_ready()
    async with serve_queen() as queen:
        await queen.register(worker, "alpha")
        async with queen.http() as http, asyncio.timeout(30):
            body = {"model": "alpha", "prompt": "a", "max_tokens": LONG, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for _line in response.aiter_lines():
                    break  # one chunk, then hang up

            stopped = ""
            while (
                metric(stopped, 'rbee_worker_requests_total{outcome="disconnected"}')
                + metric(stopped, 'rbee_worker_requests_total{outcome="cancelled"}')
                < 1
            ):
                await asyncio.sleep(0.05)
                stopped = await _metrics(worker.url, worker.headers)
            assert metric(stopped, "rbee_worker_tokens_total") < LONG / 4

            # the same for a non-streaming request whose client gives up
            with contextlib.suppress(httpx.TimeoutException):
                await http.post(
                    "/v1/completions", json={"model": "alpha", "prompt": "a", "max_tokens": LONG}, timeout=0.3
                )
            after = stopped
            while metric(after, "rbee_worker_requests_total") < 2:
                await asyncio.sleep(0.05)
                after = await _metrics(worker.url, worker.headers)
            assert metric(after, 'rbee_worker_requests_total{outcome="ok"}') == 0
            assert metric(after, "rbee_worker_tokens_total") < LONG / 2
            while (await _workers(queen))[0]["in_flight"]:
                await asyncio.sleep(0.05)
