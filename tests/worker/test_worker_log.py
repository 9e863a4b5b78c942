"""A worker that served requests leaves no traceback in its log (stderr)."""

from __future__ import annotations

from ..worker_proc import WorkerProcess
from .sse import collect
from .test_lifecycle import LONG, Reader, metric, wait_for_metric


async def test_finished_and_cancelled_requests_log_no_traceback(tiny_worker: WorkerProcess) -> None:
    async with tiny_worker.async_client() as client:
        done = await collect(client, {"prompt": "the hive", "max_tokens": 8, "seed": 1})
        assert done[-1].name == "end" and done[-1].data["tokens_out"] == 8
        async with client.stream(
            "POST", "/v1/inference", json=LONG, headers={"X-Request-ID": "stop-me"}
        ) as response:
            reader = Reader(response)
            await reader.tokens(2)
            stop_me = response.headers["x-request-id"]  # the worker names the generation
            assert (await client.delete(f"/v1/inference/{stop_me}")).status_code == 200
            assert (await reader.rest())[-1].data["stop_reason"] == "cancelled"
        # The slot is released by the request's end-of-run callback on the event loop, the one that
        # used to raise; once the gauge reads 0 that callback has run to its end.
        await wait_for_metric(client, "rbee_worker_slots_busy", 0)
        assert await metric(client, "rbee_worker_requests_total", outcome="ok") == 1
    log = tiny_worker.log()
    assert "Traceback" not in log and "Exception in callback" not in log, log
