"""Cancellation: Ctrl-C of `rbee-keeper infer`, and clients that go away from the queen
mid-stream, while queued, or while waiting for a non-streamed answer. In every case the
worker stops generating within a token or so and its slot is free for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import httpx
import openai

from tests.keeper.conftest import read_some
from tests.waiting import wait_for

from .conftest import (
    MODEL,
    QUEEN_KEY,
    E2EFleet,
    Queen,
    sse_events,
    stopped_requests,
    worker_metrics,
)

CATEGORY = "cancellation"
LONG = 4000  # tokens asked for; a cancelled request must stop far below
PROMPT = "Once upon a time"
OK = 'rbee_worker_requests_total{outcome="ok"}'


def _settled(record: dict[str, Any], before: dict[str, float], stops: int = 1) -> dict[str, float]:
    """Wait until the worker counted `stops` more stopped requests and no slot is busy."""

    def check() -> dict[str, float] | None:
        after = worker_metrics(record)
        done = stopped_requests(after) >= stopped_requests(before) + stops
        return after if done and after["rbee_worker_slots_busy"] == 0 else None

    return wait_for(check, 15, "the worker to record the stopped request and free its slot")


def _generated(after: dict[str, float], before: dict[str, float]) -> int:
    return int(after["rbee_worker_tokens_total"] - before.get("rbee_worker_tokens_total", 0))


def test_ctrl_c_of_keeper_infer_cancels_the_remote_request(e2e: E2EFleet, soak: bool, record: Any) -> None:
    keeper = e2e.keeper
    warm = keeper.run("infer", "--node", "n2", "--model", MODEL, "--prompt", "hi", "--max-tokens", "1")
    assert warm.rc == 0, warm
    (known,) = [w for w in keeper.known_workers() if w["node"] == "n2"]
    rounds = 8 if soak else 2
    exits, generated = [], []
    for _ in range(rounds):
        before = worker_metrics(known)
        proc = keeper.popen(
            "infer", "--node", "n2", "--model", MODEL, "--prompt", PROMPT, "--max-tokens", str(LONG)
        )
        try:
            read_some(proc, 20, timeout=30)
            proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            _, err = proc.communicate(timeout=20)
            exits.append(time.monotonic() - started)
        finally:
            proc.kill()
            proc.wait(10)
        assert proc.returncode == 130, err.decode(errors="replace")
        assert b"interrupted" in err and b"Traceback" not in err, err.decode(errors="replace")
        after = _settled(known, before)
        generated.append(_generated(after, before))
        assert 0 < generated[-1] < LONG // 2, f"generation went on: {generated[-1]} of {LONG} tokens"
    record(rounds=rounds, max_exit_s=round(max(exits), 2), max_tokens_generated=max(generated), asked=LONG)


async def _stream_then_leave(queen: Queen, model: str, chunks: int) -> int:
    got = 0
    async with queen.client(timeout=30) as client:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=LONG, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got >= chunks:
                    break
        await stream.close()
    return got


def _idle_in_queen(queen: Queen, node: str) -> dict[str, Any]:
    """The queen's one worker on `node`, once nothing is in flight on it (the queen releases a
    request's lease a moment after the client saw its end)."""

    def idle() -> dict[str, Any] | None:
        (entry,) = [w for w in queen.workers() if w["node"] == node]
        return entry if entry["in_flight"] == 0 else None

    return wait_for(idle, 5, f"the queen to see nothing in flight on {node}")


def _queen_worker(e2e: E2EFleet, queen: Queen, node: str) -> dict[str, Any]:
    (entry,) = [w for w in queen.workers() if w["node"] == node]
    return {**e2e.worker_record(entry["id"]), "queen_id": entry["id"]}


def test_client_disconnect_at_the_queen_stops_generation(
    e2e: E2EFleet, queen: Queen, soak: bool, record: Any
) -> None:
    model = f"n3/{MODEL}"
    asyncio.run(_stream_then_leave(queen, model, 1))  # cold start, and a first disconnect
    worker = _queen_worker(e2e, queen, "n3")
    _settled(worker, {})
    rounds = 10 if soak else 3
    generated = []
    for _ in range(rounds):
        before = worker_metrics(worker)
        asyncio.run(_stream_then_leave(queen, model, 3))
        after = _settled(worker, before)
        generated.append(_generated(after, before))
        assert generated[-1] < LONG // 2, f"generation went on: {generated[-1]} of {LONG} tokens"
    entry = _idle_in_queen(queen, "n3")
    assert entry["id"] == worker["queen_id"], entry

    async def next_one() -> str | None:
        async with queen.client() as client:
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        return reply.choices[0].finish_reason

    assert asyncio.run(next_one()) == "length", "the slot is free for the next request"
    record(rounds=rounds, max_tokens_generated=max(generated), asked=LONG)


def test_disconnect_while_queued_or_waiting_frees_everything(
    e2e: E2EFleet, queen: Queen, record: Any
) -> None:
    model = f"n3/{MODEL}"
    asyncio.run(_stream_then_leave(queen, model, 1))
    worker = _queen_worker(e2e, queen, "n3")
    before = _settled(worker, {})

    # queued: the only worker is held (SIGSTOP) under a stream, a second client gives up waiting
    async def queued() -> tuple[int, bool]:
        async with queen.client(timeout=30) as holder, queen.client(timeout=1.0) as impatient:
            stream = await holder.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=LONG, stream=True
            )
            await anext(aiter(stream))
            os.kill(int(worker["pid"]), signal.SIGSTOP)
            try:
                gave_up = False
                try:
                    await impatient.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                    )
                except openai.APITimeoutError:
                    gave_up = True
                with httpx.Client(timeout=5, headers={"Authorization": "Bearer " + QUEEN_KEY}) as http:
                    for _ in range(20):  # the queen sees the disconnect a moment later: ≤ 2 s
                        depth = _metric(http.get(f"{queen.url}/metrics").text, "rbee_queen_queue_depth")
                        if depth == 0:
                            break
                        await asyncio.sleep(0.1)
            finally:
                os.kill(int(worker["pid"]), signal.SIGCONT)
            await stream.close()
        return int(depth), gave_up

    depth, gave_up = asyncio.run(queued())
    assert gave_up, "the second request should have waited in the queen's queue"
    assert depth == 0, f"an abandoned waiter is still counted in the queue: {depth}"
    after_queued = _settled(worker, before)
    served = after_queued.get(OK, 0) - before.get(OK, 0)
    assert served == 0, "the abandoned request must never reach the worker"

    # waiting for a non-streamed answer: the client gives up while the worker generates
    async def impatient_non_stream() -> None:
        async with queen.client(timeout=60) as client:
            task = asyncio.create_task(
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=LONG
                )
            )
            busy = 0.0
            for _ in range(500):  # bounded: ~5 s
                busy = worker_metrics(worker)["rbee_worker_slots_busy"]
                if busy or task.done():
                    break
                await asyncio.sleep(0.01)
            # freeze the worker mid-generation, so a fast machine cannot finish all LONG tokens first
            os.kill(int(worker["pid"]), signal.SIGSTOP)
            try:
                assert busy and not task.done(), "the request never started generating"
                task.cancel()  # the client goes away
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await asyncio.sleep(0.3)  # the queen notices and closes its upstream connection
            finally:
                os.kill(int(worker["pid"]), signal.SIGCONT)

    asyncio.run(impatient_non_stream())
    after = _settled(worker, after_queued)  # counted as cancelled/disconnected, not as served
    generated = _generated(after, after_queued)
    assert generated < LONG // 2, f"generation went on: {generated} of {LONG} tokens"
    assert after.get(OK, 0) == after_queued.get(OK, 0), "the abandoned request must not complete"
    _idle_in_queen(queen, "n3")
    record(queue_depth_after=depth, non_stream_tokens=generated, asked=LONG)


def test_native_delete_through_the_queen_ends_with_cancelled(
    e2e: E2EFleet, queen: Queen, record: Any
) -> None:
    correlation = f"e2e-cancel-{os.getpid()}"
    headers = {"Authorization": f"Bearer {QUEEN_KEY}", "X-Request-ID": correlation}
    body = {"model": f"n3/{MODEL}", "prompt": PROMPT, "max_tokens": LONG}
    tokens, end = 0, None
    with httpx.Client(base_url=queen.url, timeout=30) as client:
        with client.stream("POST", "/v1/inference", json=body, headers=headers) as response:
            assert response.status_code == 200, response.read()
            # the queen names the request; the client's id comes back as a correlation field
            request_id = response.headers["x-request-id"]
            assert response.headers["x-correlation-id"] == correlation and request_id != correlation
            for name, data in sse_events(response.iter_bytes()):
                if name == "token":
                    tokens += 1
                    if tokens == 2:
                        deleted = client.delete(f"/v1/inference/{request_id}", headers=headers)
                        assert deleted.status_code == 200 and deleted.json()["cancelled"] is True, (
                            deleted.text
                        )
                elif name == "end":
                    end = data
        assert end is not None and end["stop_reason"] == "cancelled", end
        assert end["tokens_out"] < LONG // 2, end
        # the queen forgets the request once its response is closed (a moment after [DONE])
        wait_for(
            lambda: client.delete(f"/v1/inference/{request_id}", headers=headers).status_code == 404,
            5,
            "the finished request to be forgotten (404 on DELETE)",
        )
    worker = _queen_worker(e2e, queen, "n3")
    wait_for(lambda: worker_metrics(worker)["rbee_worker_slots_busy"] == 0, 5, "the slot to be free")
    record(tokens_out=end["tokens_out"], asked=LONG)


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and "{" in line
    )
