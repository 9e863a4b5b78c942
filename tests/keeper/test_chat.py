"""`rbee-keeper chat` driven through its stdin, `infer --prompt -`, and the busy-worker retries (EC6)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rbee_control.keeper.stream import stream_inference
from rbee_worker.protocol.client import WorkerClient
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.request import InferenceRequest

from ..hive.servers import serve_in_thread
from .conftest import Fleet, read_some


def chat(fleet: Fleet, *args: str) -> subprocess.Popen[bytes]:
    keeper = fleet.keeper
    return subprocess.Popen(
        keeper.argv("chat", "--node", "local", "--model", "tiny", "--seed", "3", *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=keeper.env,
    )


@pytest.fixture(scope="module")
def tiny_on_local(fleet: Fleet, tiny_model: Path) -> Fleet:
    run = fleet.keeper.run("models", "add", f"file:{tiny_model}", "--name", "tiny", "--node", "local")
    assert run.rc == 0, run
    return fleet


def test_chat_keeps_turns_until_end_of_input(tiny_on_local: Fleet) -> None:
    proc = chat(tiny_on_local, "--max-tokens", "6")
    out, err = proc.communicate(b"hello bee\nand again\n\n", timeout=180)
    assert proc.returncode == 0, err.decode()
    assert len(out.decode(errors="replace").strip().splitlines()) == 2, "one answer line per turn"
    assert "2 turns" in err.decode() and err.decode().count(">>> ") == 4


def test_ctrl_c_cancels_the_answer_not_the_session(tiny_on_local: Fleet) -> None:
    proc = chat(tiny_on_local)  # no --max-tokens: the tiny model talks until it is stopped
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"tell me everything\n")
        proc.stdin.flush()
        read_some(proc, 40, timeout=120)
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(b"/bye\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    text = err.decode()
    assert "cancelled" in text and "0 turns" in text, text


def test_infer_reads_the_prompt_from_stdin(tiny_on_local: Fleet) -> None:
    keeper = tiny_on_local.keeper
    argv = keeper.argv("infer", "--node", "local", "--model", "tiny", "--prompt", "-", "--max-tokens", "5")
    got = subprocess.run(
        argv, input=b"a prompt\nin two lines\n", capture_output=True, env=keeper.env, timeout=120
    )
    assert got.returncode == 0, got.stderr.decode()
    assert "5 tokens" in got.stderr.decode()
    empty = subprocess.run(argv, input=b"  \n", capture_output=True, env=keeper.env, timeout=120)
    assert empty.returncode == 1 and b"stdin was empty" in empty.stderr
    bad = keeper.run("infer", "--node", "local", "--model", "tiny", "--prompt", "hi", "--timeout", "0")
    assert bad.rc == 1 and "--timeout must be positive" in bad.err


@pytest.fixture
def busy_worker() -> Iterator[tuple[str, list[int]]]:
    """A real HTTP server that answers every inference as a worker with all slots busy."""
    calls: list[int] = []

    async def busy(request: Request) -> JSONResponse:
        calls.append(1)
        body = {"error": {"code": "ALL_SLOTS_BUSY", "message": "busy", "details": {"retry_after": 0.01}}}
        return JSONResponse(body, 503, headers={"retry-after": "1"})

    app = Starlette(routes=[Route("/v1/inference", busy, methods=["POST"])])
    with serve_in_thread(app) as url:
        yield url, calls


def test_a_busy_worker_is_asked_again_three_times(busy_worker: tuple[str, list[int]]) -> None:
    url, calls = busy_worker
    delays: list[float] = []

    async def run() -> None:
        async with WorkerClient(url, "key") as client:
            await stream_inference(
                client, InferenceRequest.from_json({"prompt": "hi"}), lambda _: None, on_busy=delays.append
            )

    with pytest.raises(RbeeError) as busy:
        asyncio.run(run())
    assert busy.value.code == "ALL_SLOTS_BUSY" and "still busy after 3 retries" in busy.value.message
    assert busy.value.details["attempts"] == 4 and len(calls) == 4
    assert delays == [0.01, 0.02, 0.04], "doubling from the worker's retry_after"


def test_logs_over_ssh_hive_worker_and_follow(fleet: Fleet, tiny_model: Path) -> None:
    keeper = fleet.keeper
    ask = ("infer", "--node", "n2", "--model", f"file:{tiny_model}", "--name", "tiny", "--prompt", "hi")
    first = keeper.run(*ask, "--max-tokens", "5")
    assert first.rc == 0, first
    (worker,) = keeper.run("worker", "list", "--node", "n2", json_mode=True).json()["n2"]
    hive = keeper.run("logs", "--node", "n2", "--hive", "--lines", "200")
    assert hive.rc == 0 and "rbee.hive" in hive.out, hive
    logs = keeper.run("logs", "--node", "n2", "--worker", worker["id"])
    assert logs.rc == 0, logs
    (access,) = [line for line in logs.out.splitlines() if "rbee.access" in line]
    assert "tokens_out=5" in access and "status=ok" in access and "cancelled=false" in access
    assert "model=rbee-tiny" in access and "ttft_ms=" in access and "request_id=" in access
    assert keeper.run("logs", "--node", "n2", "--worker", worker["id"], "--lines", "1").out.count("\n") == 1

    evil = keeper.run("logs", "--node", "n2", "--worker", "../../.ssh/authorized_keys", json_mode=True)
    assert evil.rc == 1 and evil.json()["error"]["code"] == "INVALID_REQUEST"
    absent = keeper.run("logs", "--node", "n2", "--worker", "worker-" + "0" * 12, json_mode=True)
    assert absent.rc == 1 and absent.json()["error"]["code"] == "NOT_FOUND", absent

    tail = keeper.popen("logs", "--node", "n2", "--worker", worker["id"], "--follow", "--lines", "1")
    try:
        seen = b""
        while b"tokens_out=5" not in seen:  # the last old line is shown: the follow has started
            seen += read_some(tail, 1, timeout=60)
        second = keeper.run(*ask, "--max-tokens", "3")
        assert second.rc == 0, second
        while b"tokens_out=3" not in seen:  # bounded by read_some's timeout
            seen += read_some(tail, 1, timeout=60)
        tail.send_signal(signal.SIGINT)
        tail.communicate(timeout=30)
    finally:
        tail.kill()
    assert tail.returncode == 130
