"""Faults: processes killed with SIGKILL, nodes whose sshd goes away, a download that keeps
dropping, a port someone else holds. Each case ends with the whole fleet stopped
(`hive stop --all`) and nothing of the test homes left running or listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rbee_worker.tinymodel import write_tiny_model
from tests.hive.servers import FileServer, serve_in_thread

from ..waiting import wait_for
from .conftest import MODEL, NODE_ADDRESSES, PORT_MAX, PORT_MIN, E2EFleet, Queen, worker_stream

CATEGORY = "faults"
LONG = 3000  # tokens: far more than a stream produces in the moment a test needs to kill something


@pytest.fixture
def own_queen(e2e: E2EFleet) -> Iterator[Queen]:
    """A queen for this case alone; afterwards SIGTERM (exit 0) and `hive stop --all` leaving nothing."""
    queen = e2e.start_queen()
    try:
        yield queen
        if queen.alive():
            assert queen.stop() == 0, queen.text()
    finally:
        if queen.alive():
            queen.proc.kill()
            queen.proc.wait(10)
    e2e.stop_all()


async def _ask(queen: Queen, model: str, max_tokens: int = 4) -> str:
    async with queen.client() as client:
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, seed=3
        )
    assert reply.choices[0].finish_reason == "length", reply
    return reply.choices[0].message.content or ""


def _workers_on(queen: Queen, node: str) -> list[dict[str, Any]]:
    return [w for w in queen.workers() if w["node"] == node]


def test_worker_killed_mid_stream_then_a_new_worker_serves(
    e2e: E2EFleet, own_queen: Queen, record: Any
) -> None:
    asyncio.run(_ask(own_queen, f"n2/{MODEL}"))
    (worker,) = _workers_on(own_queen, "n2")
    pid = int(e2e.worker_record(worker["id"])["pid"])

    async def stream_and_kill() -> tuple[int, BaseException | None, str | None, float]:
        chunks, error, finish = 0, None, None
        async with own_queen.client(timeout=30) as client:
            stream = await client.chat.completions.create(
                model=f"n2/{MODEL}", messages=[{"role": "user", "content": "go on"}],
                max_tokens=LONG, stream=True,
            )  # fmt: skip
            killed_at = 0.0
            try:
                async with asyncio.timeout(20):
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            chunks += 1
                            if chunks == 3:
                                os.kill(pid, signal.SIGKILL)
                                killed_at = time.monotonic()
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
            except openai.APIError as exc:
                error = exc
        return chunks, error, finish, time.monotonic() - killed_at

    chunks, error, finish, to_error = asyncio.run(stream_and_kill())
    assert finish is None, f"the stream finished normally ({finish}) although its worker was killed"
    assert isinstance(error, openai.APIError), "the client must get an error, not silence"
    assert "WORKER_CRASHED" in str(error) or "failed after the first token" in str(error), error

    started = time.monotonic()
    asyncio.run(_ask(own_queen, f"n2/{MODEL}"))
    recovery = time.monotonic() - started
    (new,) = _workers_on(own_queen, "n2")
    assert new["id"] != worker["id"], "the dead worker must not be routed to again"
    record(
        chunks_received=chunks,
        ms_to_error=round(to_error * 1000),
        seconds_to_new_worker=round(recovery, 1),
    )


def test_hive_killed_then_restarted_and_stopped_cleanly(e2e: E2EFleet, record: Any) -> None:
    keeper = e2e.keeper
    spawned = keeper.run("worker", "spawn", "--node", "n3", "--model", MODEL, json_mode=True)
    assert spawned.rc == 0, spawned
    worker = e2e.worker_record(spawned.json()["id"])
    hive = e2e.hive_pid("n3")
    assert hive is not None
    os.kill(hive, signal.SIGKILL)
    wait_for(lambda: not _alive(hive), 10, "the hive to die")

    # the data plane does not need the hive: its worker keeps serving
    body = {"prompt": "the hive", "max_tokens": 8, "seed": 1}
    assert worker_stream(worker, body)["end"]["tokens_out"] == 8

    started = keeper.run("hive", "start", "--node", "n3", json_mode=True)
    assert started.rc == 0, started
    assert started.json()["n3"]["status"] == "started"
    listed = keeper.run("worker", "list", "--node", "n3", json_mode=True)
    assert listed.rc == 0, listed
    assert [w["id"] for w in listed.json()["n3"]] == [worker["id"]], "the restarted hive re-adopts its worker"

    stopped = keeper.run("hive", "stop", "--node", "n3", json_mode=True)
    assert stopped.rc == 0, stopped
    assert stopped.json()["n3"]["stopped"] is True and stopped.json()["n3"]["workers_stopped"] == 1
    home = str(e2e.home("n3"))
    left = [p.pid for p in e2e.processes() if home in " ".join(p.cmdline())]
    ports = [key for key in e2e.listening() if key[0] == NODE_ADDRESSES["n3"]]
    assert not left and not ports, f"left on n3 after hive stop: pids {left}, ports {ports}"
    e2e.stop_all()
    record(restart_s=round(started.seconds, 2), stop_s=round(stopped.seconds, 2))


def test_queen_cold_starts_again_after_the_hive_went_away(
    e2e: E2EFleet, own_queen: Queen, record: Any
) -> None:
    asyncio.run(_ask(own_queen, f"n4/{MODEL}"))
    stopped = e2e.keeper.run("hive", "stop", "--node", "n4")
    assert stopped.rc == 0, stopped
    started = time.monotonic()
    try:
        asyncio.run(_ask(own_queen, f"n4/{MODEL}"))
    finally:
        record(seconds=round(time.monotonic() - started, 1))


def test_queen_killed_then_restarted_and_fleet_stops_clean(e2e: E2EFleet, record: Any) -> None:
    first = e2e.start_queen()
    port = int(first.url.rsplit(":", 1)[1])
    asyncio.run(_ask(first, f"n2/{MODEL}"))
    asyncio.run(_ask(first, f"n4/{MODEL}"))
    first.proc.kill()
    assert first.proc.wait(10) == -signal.SIGKILL
    assert len(e2e.processes()) >= 4, "its hives and workers outlive a queen killed with SIGKILL"

    started = time.monotonic()
    second = e2e.start_queen(port=port)  # same URL for the clients
    try:
        text = asyncio.run(_ask(second, MODEL))
        restart = time.monotonic() - started
        assert text
        assert second.stop() == 0, second.text()
    finally:
        if second.alive():
            second.proc.kill()
    stop = e2e.stop_all()
    record(restart_to_answer_s=round(restart, 1), stop_all_s=round(stop.seconds, 2))


def test_sshd_down_during_status_is_reported_others_fine(e2e: E2EFleet, record: Any) -> None:
    n4 = e2e.nodes["n4"]
    n4.stop()
    try:
        run = e2e.keeper.run("status", json_mode=True)
    finally:
        n4.start()
    assert run.rc == 1, run
    result = run.json()
    assert result["n4"]["error"]["code"] == "CONNECTION_FAILED", result["n4"]
    assert "error" not in result["n2"] and "error" not in result["n3"], result
    assert "Traceback" not in run.err
    assert result["n4"]["error"]["details"]["attempts"] == 3, "a closed port: quick retries, no timeout"
    record(seconds=round(run.seconds, 2))


def _stderr_until(proc: Any, needle: str, timeout: float) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"never saw {needle!r}: {seen.decode(errors='replace')}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"stderr closed before {needle!r}: {seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode(errors="replace")


def test_sshd_down_before_infer_is_connection_failed(e2e: E2EFleet, record: Any) -> None:
    keeper, n4 = e2e.keeper, e2e.nodes["n4"]
    e2e.stop_all()  # no worker on n4 that the keeper could reach without SSH
    n4.stop()
    try:
        run = keeper.run("infer", "--node", "n4", "--model", MODEL, "--prompt", "hi", json_mode=True)
    finally:
        n4.start()
    assert run.rc == 1, run
    assert run.json()["error"]["code"] == "CONNECTION_FAILED", run
    assert "Traceback" not in run.err
    record(seconds=round(run.seconds, 2))


def test_sshd_drops_during_infer_is_a_clean_connection_failed(e2e: E2EFleet, record: Any) -> None:
    keeper, n4 = e2e.keeper, e2e.nodes["n4"]
    e2e.stop_all()  # infer must go through SSH and start a worker
    proc = keeper.popen("infer", "--node", "n4", "--model", MODEL, "--prompt", "hi")
    try:
        _stderr_until(proc, "starting a worker", timeout=30)
        n4.stop()  # the node drops while the keeper waits for the worker over SSH
        started = time.monotonic()
        out, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - started
    finally:
        proc.kill()
        n4.start()
    e2e.stop_all()  # the worker the hive was starting is stopped with it
    text = err.decode(errors="replace")
    # (the traceback that sometimes follows is test_dropped_ssh_connection_leaves_no_unretrieved_error)
    record(seconds_to_exit_after_drop=round(seconds, 2), traceback_shown="Traceback" in text)
    assert proc.returncode == 1, text
    assert "error [CONNECTION_FAILED]" in text and "n4" in text, text
    assert out == b""


def test_dropped_ssh_connection_leaves_no_unretrieved_error(
    e2e: E2EFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rbee_control.inventory.loader import load_inventory
    from rbee_control.ssh.pool import TransportPool
    from rbee_worker.protocol.errors import RbeeError

    monkeypatch.setenv("RBEE_CONFIG_DIR", str(e2e.keeper.config_dir))  # the pinned host keys
    n4 = e2e.nodes["n4"]

    async def drop_mid_command() -> tuple[str | None, list[str]]:
        unretrieved: list[str] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: unretrieved.append(str(context.get("message")))
        )
        inventory = load_inventory(e2e.keeper.inventory)
        code = None
        async with TransportPool(inventory) as pool:
            transport = await pool.get(inventory.node("n4"))
            try:
                async with transport.stream(["sleep", "20"]) as command:
                    n4.stop()  # the node goes away while the command runs
                    async for _line in command:
                        pass
            except RbeeError as exc:
                code = exc.code  # (holding the exception would keep the whole stream alive)
            command = None  # type: ignore[assignment]
        gc.collect()  # a task dropped with an exception reports it now, not at some later point
        await asyncio.sleep(0)
        return code, [m for m in unretrieved if "never retrieved" in m]

    try:
        code, unretrieved = asyncio.run(asyncio.wait_for(drop_mid_command(), 60))
    finally:
        n4.start()
    assert code == "CONNECTION_FAILED", code
    assert not unretrieved, unretrieved


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    with serve_in_thread(server.app()) as url:
        server.url = url
        yield server


def test_download_that_drops_connections_resumes(
    e2e: E2EFleet, file_server: FileServer, tmp_path: Path, record: Any
) -> None:
    model = write_tiny_model(tmp_path / "x.gguf", seed=7)
    url = file_server.add("x.gguf", model, drop_first=2)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()  # plain http needs one
    run = e2e.keeper.run("models", "add", url, "--node", "n2", "--sha256", digest, json_mode=True)
    assert run.rc == 0, run
    row = run.json()
    assert row["name"] == "x" and row["size"] == model.stat().st_size, row
    e2e.expected_catalog["n2"].add("x")
    seen = file_server.requests_for("x.gguf")
    ranged = [s for s in seen if s.method == "GET" and s.range]
    assert ranged, f"the download never resumed with Range: {seen}"
    stored = Path(row["path"])
    assert stored.read_bytes() == model.read_bytes()
    assert not list(stored.parent.glob("*.part")), "no partial file is left behind"

    removed = e2e.keeper.run("models", "rm", "x", "--node", "n2")
    assert removed.rc == 0, removed
    e2e.expected_catalog["n2"].discard("x")
    record(requests=len(seen), resumed=len(ranged), seconds=round(run.seconds, 2))


def test_taken_port_in_the_hive_range_is_skipped(e2e: E2EFleet, record: Any) -> None:
    e2e.stop_all()
    address = NODE_ADDRESSES["n4"]
    squatters: list[socket.socket] = []
    try:
        for port in (PORT_MIN, PORT_MIN + 1):  # someone else's listener on the first two ports
            sock = socket.create_server((address, port))
            squatters.append(sock)
        run = e2e.keeper.run("worker", "spawn", "--node", "n4", "--model", MODEL, json_mode=True)
        assert run.rc == 0, run
        port = int(run.json()["port"])
        assert PORT_MIN + 1 < port <= PORT_MAX, run.json()
        with httpx.Client(timeout=5) as client:
            assert client.get(f"http://{address}:{port}/health").status_code == 200
    finally:
        for sock in squatters:
            with contextlib.suppress(OSError):
                sock.close()
    e2e.stop_all()
    record(port=port, seconds=round(run.seconds, 2))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError, ValueError):
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    return True
