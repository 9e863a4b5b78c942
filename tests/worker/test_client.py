"""WorkerClient against a real worker: every call, and every error it maps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rbee_worker.protocol import events
from rbee_worker.protocol.client import WorkerClient
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.request import InferenceRequest

from ..worker_proc import WorkerProcess, free_port


async def test_stream_ready_health_load(shared_tiny_worker: WorkerProcess) -> None:
    async with shared_tiny_worker.worker_client() as worker:
        assert await worker.health()
        ready = await worker.ready()
        assert ready.ok and ready.model == "rbee-tiny" and ready.slots == 1
        async with await worker.stream(InferenceRequest("the bee", max_tokens=5, seed=1), "req-1") as stream:
            names = [e.name async for e in stream.events()]
        assert stream.correlation_id == "req-1"
        assert stream.request_id and stream.request_id != "req-1"  # the worker names the generation
        assert names[0] == events.STARTED and names[-1] == events.END and names.count(events.TOKEN) == 5
        load = await worker.load()
        assert load.slots_busy == 0 and load.last_token_at > 0
        assert "rbee_worker_slots_busy" in await worker.metrics_text()


async def test_error_answers_become_the_workers_rbee_error(shared_tiny_worker: WorkerProcess) -> None:
    async with shared_tiny_worker.worker_client("not-the-key") as stranger:
        with pytest.raises(RbeeError) as refused:
            await stranger.stream(InferenceRequest("hi"))
        assert refused.value.code == ErrorCode.INVALID_API_KEY and refused.value.status == 401
        with pytest.raises(RbeeError) as refused:
            await stranger.ready()
        assert refused.value.code == ErrorCode.INVALID_API_KEY
        assert await stranger.health()  # liveness needs no key
    async with shared_tiny_worker.worker_client() as worker:
        with pytest.raises(RbeeError) as bad:
            await worker.stream(InferenceRequest("hi", temperature=9.0))
        assert bad.value.code == ErrorCode.INVALID_REQUEST and bad.value.status == 400
        assert bad.value.details["field"] == "temperature"


async def test_ids_and_urls_are_checked_before_anything_is_sent(shared_tiny_worker: WorkerProcess) -> None:
    async with shared_tiny_worker.worker_client() as worker:
        for bad_id in ("../admin/shutdown", "a b", "", "x" * 129):
            with pytest.raises(RbeeError) as info:
                await worker.cancel(bad_id)
            assert info.value.details["field"] == "request_id"
        with pytest.raises(RbeeError) as info:
            await worker.stream(InferenceRequest("hi"), "id/with/slashes")
        assert info.value.details["field"] == "request_id"
        assert await worker.cancel("no-such-request") is False
        assert (await worker.ready()).ok  # still serving: nothing reached it
    for url in ("localhost:8081", "ftp://h:1", "http://h:1/?q=1", ""):
        with pytest.raises(RbeeError) as info:
            WorkerClient(url, "k")
        assert info.value.details["field"] == "url"


async def test_cancel_ends_the_stream_and_busy_is_503(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    process = worker_factory(tiny_model, ctx=16384, queue=0)
    process.wait_ready()
    async with process.worker_client() as worker:
        stream = await worker.stream(InferenceRequest("the bee", max_tokens=100_000, seed=1), "long-one")
        async with stream:
            seen = stream.events()
            async for event in seen:
                if event.name == events.TOKEN:
                    break
            with pytest.raises(RbeeError) as busy:
                await worker.stream(InferenceRequest("another"))
            assert busy.value.code == ErrorCode.ALL_SLOTS_BUSY and busy.value.status == 503
            assert await worker.cancel(stream.request_id) is True
            last = [e async for e in seen][-1]
        assert last.name == events.END and last.data["stop_reason"] == events.STOP_CANCELLED


async def test_shutdown_drains_and_the_process_exits(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    process = worker_factory(tiny_model, ctx=16384)
    process.wait_ready()
    async with process.worker_client() as worker:
        await worker.shutdown()
    assert await asyncio.to_thread(process.wait_exit, 30) == 0
    async with WorkerClient(f"http://127.0.0.1:{free_port()}", "k") as nobody:
        assert await nobody.health(timeout=2) is False
