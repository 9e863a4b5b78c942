"""Cold start: a fleet that starts real worker processes on demand, counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rbee_control.queen import ModelEntry, QueenSettings, WorkerEntry
from rbee_control.queen.fleet import Fleet
from rbee_control.queen.router import RouterSettings

from ..worker_proc import WorkerProcess
from .conftest import metric, serve_queen


class ProcessFleet:
    """Starts `rbee-worker` processes itself (a real control plane in miniature) and counts spawns."""

    def __init__(self, model: Path, factory: type[WorkerProcess], spawn_delay: float = 0.3) -> None:
        self.model = model
        self.factory = factory
        self.spawn_delay = spawn_delay
        self.spawns = 0
        self.workers: list[WorkerProcess] = []
        self.closed = False

    async def list_models(self) -> list[ModelEntry]:
        return [ModelEntry("cold", "local", context_length=2048)]

    async def spawn(self, model: str, node: str) -> WorkerEntry:
        self.spawns += 1
        await asyncio.sleep(self.spawn_delay)  # let every concurrent request arrive while we start

        def start() -> WorkerProcess:
            worker = self.factory(self.model, ctx=2048)
            worker.wait_ready()
            return worker

        worker = await asyncio.to_thread(start)
        self.workers.append(worker)
        return WorkerEntry(f"cold-{self.spawns}", node, worker.url, worker.api_key, model)

    async def stop_worker(self, entry: WorkerEntry) -> None:
        for worker in self.workers:
            if worker.url == entry.url:
                await asyncio.to_thread(worker.kill)

    async def close(self) -> None:
        self.closed = True
        await asyncio.gather(*(asyncio.to_thread(w.kill) for w in self.workers))


async def test_eight_concurrent_requests_for_a_cold_model_spawn_one_worker(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    fleet = ProcessFleet(tiny_model, worker_factory)
    assert isinstance(fleet, Fleet)
    async with serve_queen(fleet) as queen:
        client = queen.openai()
        assert [m.id for m in (await client.models.list()).data] == ["cold"]

        async def ask(seed: int) -> str | None:
            stream = await client.chat.completions.create(
                model="cold",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=16,
                seed=seed,
                stream=True,
            )
            chunks = [c async for c in stream]
            return chunks[-1].choices[0].finish_reason

        async with asyncio.timeout(60):
            reasons = await asyncio.gather(*(ask(seed) for seed in range(8)))
        assert all(r in ("stop", "length") for r in reasons)
        assert fleet.spawns == 1
        text = queen.state.metrics.render().decode()
        assert metric(text, 'rbee_queen_cold_starts_total{model="cold",node="local",outcome="ok"}') == 1
        async with queen.admin() as http:
            listed = (await http.get("/v2/workers/list")).json()["workers"]
        assert [(w["model"], w["owned"]) for w in listed] == [("cold", True)]
    # the queen stopped what it started
    assert fleet.closed and all(w.proc.poll() is not None for w in fleet.workers)


class BrokenFleet(ProcessFleet):
    async def spawn(self, model: str, node: str) -> WorkerEntry:
        self.spawns += 1
        await asyncio.sleep(0.2)
        raise RuntimeError("no such runtime on this node")


async def test_a_failed_cold_start_answers_every_waiting_client_once(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    fleet = BrokenFleet(tiny_model, worker_factory)
    async with serve_queen(fleet) as queen, queen.http() as http, asyncio.timeout(30):
        body = {"model": "cold", "prompt": "x", "max_tokens": 4}
        answers = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(4)))
    assert {a.status_code for a in answers} == {500}
    assert all("no such runtime" in a.json()["error"]["message"] for a in answers)
    assert fleet.spawns == 1


async def test_a_cold_start_slower_than_its_bound_is_a_clean_503(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    fleet = ProcessFleet(tiny_model, worker_factory, spawn_delay=3)
    settings = QueenSettings(router=RouterSettings(cold_start_timeout=0.5))
    async with serve_queen(fleet, settings=settings) as queen, queen.http() as http:
        response = await http.post("/v1/completions", json={"model": "cold", "prompt": "x", "max_tokens": 4})
    assert response.status_code == 503 and response.json()["error"]["code"] == "LOADING_TIMEOUT"
    assert "retry-after" in response.headers
    assert fleet.workers == []  # the unfinished start was abandoned at shutdown, not left running
