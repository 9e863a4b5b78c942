"""Slots and queue, cancellation, draining shutdown and bad model files — real processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rbee_worker.protocol.events import Event, iter_events

from ..worker_proc import WorkerProcess
from .sse import collect

LONG = {"prompt": "the hive", "max_tokens": 16000, "seed": 1}
LETTER_A = 260  # the tiny model's token id of "a" (after 3 specials, 256 bytes and "▁")


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not in metrics")


async def wait_for_metric(
    client: httpx.AsyncClient, name: str, value: float, timeout: float = 20, **labels: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await metric(client, name, **labels) == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {value}")


class Reader:
    """Reads a stream a little at a time; holding the iterator keeps the connection open."""

    def __init__(self, response: httpx.Response) -> None:
        self.events = aiter(iter_events(response.aiter_bytes()))

    async def tokens(self, n: int) -> list[str]:
        seen: list[str] = []
        while len(seen) < n:
            event = await anext(self.events)
            if event.name == "token":
                seen.append(event.data["t"])
        return seen

    async def rest(self) -> list[Event]:
        return [event async for event in self.events]


async def test_busy_worker_queues_then_refuses(worker_factory: type[WorkerProcess], tiny_model: Path) -> None:
    worker = worker_factory(tiny_model, slots=1, queue=1, ctx=16384)
    worker.wait_ready()
    async with worker.async_client() as client:
        async with client.stream(
            "POST", "/v1/inference", json=LONG, headers={"X-Request-ID": "a"}
        ) as running:
            held = Reader(running)
            await held.tokens(2)
            async with client.stream(
                "POST", "/v1/inference", json={"prompt": "q", "max_tokens": 3}
            ) as queued:
                assert queued.status_code == 200
                refused = await client.post("/v1/inference", json={"prompt": "r", "max_tokens": 3})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "ALL_SLOTS_BUSY"
                assert int(refused.headers["retry-after"]) >= 1
                assert await metric(client, "rbee_worker_queue_depth") == 1
                assert await metric(client, "rbee_worker_slots_busy") == 1
                running_id = running.headers["x-request-id"]
                caller_id = await client.delete("/v1/inference/a")
                assert caller_id.status_code == 404, "a caller's X-Request-ID cancels nothing"
                assert (await client.delete(f"/v1/inference/{running_id}")).status_code == 200
                events = await Reader(queued).rest()
            cancelled = await held.rest()
        assert events[-1].name == "end" and events[-1].data["tokens_out"] == 3
        assert cancelled[-1].data["stop_reason"] == "cancelled"
        after = await collect(client, {"prompt": "s", "max_tokens": 2})
        assert after[-1].data["tokens_out"] == 2


async def test_two_slots_stream_concurrently(worker_factory: type[WorkerProcess], tiny_model: Path) -> None:
    # llama.cpp is not batch-invariant (ggml-org/llama.cpp#6950): a sequence decoded beside another may
    # sample otherwise than alone, so equality with a solo run proves nothing. Instead each stream is
    # confined to its own letters by logit_bias; one letter of the other's in a stream would be mixing.
    letters = ("abcd", "wxyz")
    bodies = [
        {
            "prompt": f"p{i}",
            "max_tokens": 50,
            "seed": i,
            "logit_bias": {str(LETTER_A + ord(c) - 97): 100 for c in own},
        }
        for i, own in enumerate(letters)
    ]
    worker = worker_factory(tiny_model, slots=2, queue=0, ctx=16384)
    worker.wait_ready()
    async with worker.async_client() as client:
        results = await asyncio.gather(*(collect(client, b) for b in bodies))
    for events, own in zip(results, letters, strict=True):
        tokens = [e.data for e in events if e.name == "token"]
        assert events[-1].data["tokens_out"] == 50 and [t["i"] for t in tokens] == list(range(50))
        text = "".join(t["t"] for t in tokens)
        assert len(text) == 50 and set(text) <= set(own), f"streams must not mix: {text!r}"


async def test_delete_cancels_within_a_token(tiny_worker: WorkerProcess) -> None:
    async with tiny_worker.async_client() as client:
        async with client.stream(
            "POST", "/v1/inference", json=LONG, headers={"X-Request-ID": "job"}
        ) as response:
            reader = Reader(response)
            await reader.tokens(3)
            cancel = await client.delete(f"/v1/inference/{response.headers['x-request-id']}")
            assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
            events = await reader.rest()
        end = events[-1]
        assert end.name == "end" and end.data["stop_reason"] == "cancelled"
        assert end.data["tokens_out"] < LONG["max_tokens"] // 2
        await wait_for_metric(client, "rbee_worker_slots_busy", 0)
        assert await metric(client, "rbee_worker_requests_total", outcome="cancelled") == 1


async def test_client_disconnect_stops_generation(tiny_worker: WorkerProcess) -> None:
    async with tiny_worker.async_client() as client:
        async with client.stream("POST", "/v1/inference", json=LONG) as response:
            reader = Reader(response)
            await reader.tokens(3)
        # Leaving the block closes the connection mid-stream.
        await wait_for_metric(client, "rbee_worker_slots_busy", 0)
        await wait_for_metric(client, "rbee_worker_requests_total", 1, outcome="disconnected")
        generated = await metric(client, "rbee_worker_tokens_total")
        assert 3 <= generated < LONG["max_tokens"] // 2, f"generation ran on after disconnect: {generated}"
        events = await collect(client, {"prompt": "next", "max_tokens": 4})
        assert events[-1].data["tokens_out"] == 4, "the slot must be free again"


async def test_shutdown_drains_running_request(tiny_worker: WorkerProcess) -> None:
    body = {"prompt": "drain", "max_tokens": 3000, "seed": 2}
    async with (
        tiny_worker.async_client() as client,
        client.stream("POST", "/v1/inference", json=body) as response,
    ):
        reader = Reader(response)
        await reader.tokens(1)
        shutdown = await client.post("/v1/admin/shutdown")
        assert shutdown.status_code == 202 and shutdown.json()["running"] == 1
        refused = await client.post("/v1/inference", json={"prompt": "late"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "WORKER_DRAINING"
        rest = await reader.rest()
    assert rest[-1].name == "end" and rest[-1].data["stop_reason"] == "max_tokens"
    assert rest[-1].data["tokens_out"] == 3000
    assert tiny_worker.wait_exit(30) == 0


async def test_sigterm_exits_cleanly(tiny_worker: WorkerProcess) -> None:
    tiny_worker.proc.terminate()
    assert tiny_worker.wait_exit(30) == 0


async def test_corrupt_and_truncated_models_fail_clearly(
    worker_factory: type[WorkerProcess], tiny_model: Path, tmp_path: Path
) -> None:
    data = tiny_model.read_bytes()
    cases = {
        "truncated.gguf": data[: len(data) // 2],
        "notgguf.gguf": b"this is not a model at all" * 100,
        "header-only.gguf": data[:300],
    }
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        worker = worker_factory(bad)
        deadline = time.monotonic() + 20
        body: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{worker.url}/v1/ready", headers=worker.headers, timeout=2)
                body = r.json()
                if body["state"] == "failed":
                    assert r.status_code == 503
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        assert body.get("state") == "failed", (name, body)
        assert body["error"]["code"] == "INVALID_MODEL_FILE", body
        assert worker.wait_exit(30) == 1
        log = worker.log()
        assert "Traceback" not in log, log
        assert f"rbee-worker: {bad}: not a usable GGUF model" in log
        assert bad.read_bytes() == content, "a bad file is reported, never modified"


async def test_wrong_backend_for_architecture_is_explained(
    worker_factory: type[WorkerProcess], smollm2: Path
) -> None:
    worker = worker_factory(smollm2, backend="ctransformers")
    assert worker.wait_exit(30) == 1
    assert "ctransformers cannot run" in worker.log() and "--runtime llama-cpp" in worker.log()


async def test_port_in_use_fails_fast(worker_factory: type[WorkerProcess], tiny_model: Path) -> None:
    first = worker_factory(tiny_model)
    first.wait_ready()
    second = worker_factory(tiny_model, extra=["--port", str(first.port)])
    assert second.wait_exit(30) == 1
    assert f"cannot bind 127.0.0.1:{first.port}" in second.log()
