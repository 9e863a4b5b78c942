"""Workers under a real hive daemon: spawn, stream, health and idle loops, restart, cascading stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee_control.hive.client import HiveClient
from rbee_control.hive.paths import HivePaths
from rbee_control.hive.spawn import port_is_free
from rbee_worker.protocol.client import WorkerClient
from rbee_worker.protocol.request import InferenceRequest

from ..waiting import wait_for as wait_until
from .conftest import Hive, cleanup, gone, hive_env
from .servers import FileServer

PORTS = ("--port-min", "8700", "--port-max", "8799")
FAST = ("--health-interval", "0.3", "--poll-interval", "0.2", "--stop-timeout", "2", *PORTS)
LONG = {"prompt": "the hive", "max_tokens": 16000, "seed": 1}


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, file_server: FileServer, tiny_model: Path
) -> Iterator[Hive]:
    """One daemon for the module, with loops fast enough to watch."""
    tmp = tmp_path_factory.mktemp("node")
    hive = Hive(tmp / "home", hive_env(tmp, file_server))
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    hive.start(*FAST)
    yield hive
    cleanup(hive)


def workers(hive: Hive) -> dict[str, dict[str, Any]]:
    """The registry, straight from the socket (the CLI's JSON is checked elsewhere; this is for polling)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(hive.home / "hive.sock")), timeout=10) as client:
        return {w["id"]: w for w in client.get("http://hive/v1/workers/list").json()["workers"]}


async def live_workers(hive: Hive) -> dict[str, dict[str, Any]]:
    async with HiveClient(HivePaths(hive.home)) as client:
        return {w.id: w.to_json() for w in await client.list_workers()}


def spawn(hive: Hive, *options: str) -> dict[str, Any]:
    return hive.run("worker", "spawn", "--model", "tiny", "--ctx", "16384", *options).result


def wait_idle(hive: Hive, *ids: str) -> None:
    wait_until(lambda: all(workers(hive).get(i, {}).get("state") == "idle" for i in ids), 30, f"{ids} idle")


async def stream(worker: dict[str, Any], body: dict[str, Any]) -> list[Any]:
    async with (
        WorkerClient(worker["url"], worker["api_key"]) as client,
        await client.stream(InferenceRequest.from_json(body)) as response,
    ):
        assert response.response.status_code == 200
        return [e async for e in response.events()]


async def test_two_workers_on_two_ports_stream_at_once(node: Hive) -> None:
    used = {w["port"] for w in workers(node).values()}
    first = next(p for p in range(8700, 8800) if p not in used and port_is_free("127.0.0.1", p))
    with socket.socket() as squatter:  # the port the hive would pick next is taken by someone else
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first))
        squatter.listen()
        a, b = spawn(node, "--runtime", "ctransformers"), spawn(node, "--runtime", "ctransformers")
    assert first < a["port"] < b["port"]
    assert a["state"] == b["state"] == "loading"
    assert a["port"] != b["port"] and a["api_key"] != b["api_key"] and a["runtime"] == "ctransformers"
    for w in (a, b):
        assert w["api_key"] not in " ".join(psutil.Process(w["pid"]).cmdline()), "keys never go on argv"
        record = node.home / "workers" / f"{w['id']}.json"
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        assert json.loads(record.read_text())["api_key"] == w["api_key"]
        assert (node.home / "logs" / f"{w['id']}.log").exists()
    wait_idle(node, a["id"], b["id"])
    results = await asyncio.gather(
        *(stream(w, {"prompt": "bee", "max_tokens": 12, "seed": 3}) for w in (a, b))
    )
    for events in results:
        assert events[-1].name == "end" and events[-1].data["tokens_out"] == 12
    async with httpx.AsyncClient() as client:
        refused = await client.post(
            f"{a['url']}/v1/inference",
            headers={"Authorization": f"Bearer {b['api_key']}"},
            json={"prompt": "x"},
        )
    assert refused.status_code == 401

    for w in (a, b):
        assert node.run("worker", "stop", w["id"]).result["how"] == "graceful"
        assert gone(w["pid"]) and port_is_free("127.0.0.1", w["port"])
    assert not {a["id"], b["id"]} & {w["id"] for w in node.run("worker", "list").result["workers"]}
    assert node.run("worker", "stop", a["id"]).error["code"] == "WORKER_NOT_FOUND"


def test_health_loop_removes_dead_and_hung_workers(node: Hive) -> None:
    dead, hung = spawn(node), spawn(node)
    wait_idle(node, dead["id"], hung["id"])
    os.kill(dead["pid"], signal.SIGKILL)
    os.kill(hung["pid"], signal.SIGSTOP)  # alive, but its /health never answers
    try:
        wait_until(
            lambda: not {dead["id"], hung["id"]} & set(workers(node)), 10, "both to leave the registry"
        )
        wait_until(lambda: gone(hung["pid"]), 10, "the hung worker to be killed")
    finally:
        if not gone(hung["pid"]):
            os.kill(hung["pid"], signal.SIGCONT)
    assert not (node.home / "workers" / f"{dead['id']}.json").exists()
    assert f"{dead['id']} removed" in node.log()
    assert f"stopping {hung['id']} (pid {hung['pid']}): 3 failed health probes" in node.log()


async def test_idle_timeout_spares_a_streaming_worker(node: Hive) -> None:
    idle, busy = spawn(node, "--idle-timeout", "1.5"), spawn(node, "--idle-timeout", "1.5")
    deadline = time.monotonic() + 30
    while any(w["state"] != "idle" for w in (await live_workers(node)).values()):
        assert time.monotonic() < deadline, "workers never loaded"
        await asyncio.sleep(0.05)
    reader = asyncio.create_task(stream(busy, LONG))  # ~30 s of tokens unless the client leaves
    deadline = time.monotonic() + 10
    while idle["id"] in await live_workers(node):
        assert time.monotonic() < deadline, "the idle worker was never stopped"
        await asyncio.sleep(0.1)
    assert gone(idle["pid"])
    await asyncio.sleep(2)  # the streaming worker outlives the idle one by more than its timeout
    seen = (await live_workers(node))[busy["id"]]
    assert seen["state"] == "busy" and seen["slots_busy"] == 1 and not reader.done()
    reader.cancel()  # the client goes away: the worker goes idle, and one timeout later it is stopped
    await asyncio.to_thread(
        wait_until, lambda: busy["id"] not in workers(node), 10, "the idle worker to stop"
    )
    assert gone(busy["pid"])
    assert f"stopping {busy['id']}" in node.log() and "idle for" in node.log()


def test_an_embedding_worker_is_spawned_listed_and_refused_on_ctransformers(node: Hive) -> None:
    worker = spawn(node, "--embedding", "--wait")
    try:
        assert worker["embedding"] is True and worker["state"] == "idle"
        assert workers(node)[worker["id"]]["embedding"] is True
        headers = {"Authorization": f"Bearer {worker['api_key']}"}
        answer = httpx.post(
            f"{worker['url']}/v1/embeddings", json={"input": "bee"}, headers=headers, timeout=30
        )
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 64
    finally:
        node.run("worker", "stop", worker["id"])
    before = set(workers(node))
    refused = node.run("worker", "spawn", "--model", "tiny", "--runtime", "ctransformers", "--embedding")
    assert "cannot compute embeddings" in refused.error["message"] and set(workers(node)) == before


def test_a_cache_type_the_model_cannot_hold_is_refused_before_any_process(node: Hive) -> None:
    """q8_0 stores 32 values per block; the tiny model's heads hold 16 (SmolLM2's 64 serve q8_0:
    tests/worker/test_batching.py)."""
    before = set(workers(node))
    refused = node.run("worker", "spawn", "--model", "tiny", "--cache-type", "q8_0").error
    assert refused["code"] == "INVALID_REQUEST" and refused["details"]["field"] == "cache_type", refused
    assert "blocks of 32 values" in refused["message"] and refused["hint"] == "--cache-type f16"
    ctransformers = node.run(
        "worker", "spawn", "--model", "tiny", "--runtime", "ctransformers", "--cache-type", "q4_0"
    )
    assert ctransformers.error["details"]["field"] == "cache_type", ctransformers.error
    assert set(workers(node)) == before


def test_stop_cascades_to_every_worker(node: Hive) -> None:
    """Last in the module: it stops the module's daemon."""
    ws = [spawn(node), spawn(node)]
    wait_idle(node, *(w["id"] for w in ws))
    daemon = node.daemon_pid
    done = node.stop()
    assert done["stopped"] and done["workers_stopped"] == 2 and done["orphans_stopped"] == 0
    assert daemon is not None and gone(daemon)
    for w in ws:
        assert gone(w["pid"]) and port_is_free("127.0.0.1", w["port"])
    assert list((node.home / "workers").iterdir()) == []


async def test_sigterm_lets_the_running_request_finish(hive: Hive, tiny_model: Path) -> None:
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    hive.start(*PORTS)
    w = spawn(hive, "--wait")
    running = asyncio.create_task(stream(w, {"prompt": "bee", "max_tokens": 800, "seed": 1}))
    await asyncio.sleep(0.5)
    daemon = hive.daemon_pid
    assert daemon is not None
    os.kill(daemon, signal.SIGTERM)
    events = await running
    assert events[-1].name == "end" and events[-1].data["tokens_out"] == 800, (
        "graceful: the request completes"
    )
    await asyncio.to_thread(wait_until, lambda: gone(daemon), 20, "the daemon to exit")
    assert gone(w["pid"]) and port_is_free("127.0.0.1", w["port"])
    assert not (hive.home / "hive.sock").exists() and list((hive.home / "workers").iterdir()) == []


def kill_daemon(hive: Hive) -> None:
    """SIGKILL: no cascade, so the workers (in their own sessions) outlive it."""
    pid = hive.daemon_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), 5, "the killed daemon")


def test_restart_rebuilds_the_registry_honestly(hive: Hive, tiny_model: Path) -> None:
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    hive.start(*FAST)
    w1, w2 = spawn(hive), spawn(hive)
    wait_idle(hive, w1["id"], w2["id"])
    kill_daemon(hive)
    assert not gone(w1["pid"]) and not gone(w2["pid"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    fake = {**json.loads((hive.home / "workers" / f"{w1['id']}.json").read_text()), "pid": dead.pid}
    (hive.home / "workers" / "worker-dead.json").write_text(json.dumps({**fake, "id": "worker-dead"}))

    assert hive.start(*FAST)["status"] == "started"
    adopted = {w["id"]: w for w in hive.ok("worker", "list")["workers"]}
    assert set(adopted) == {w1["id"], w2["id"]} and {w["state"] for w in adopted.values()} == {"idle"}
    assert not (hive.home / "workers" / "worker-dead.json").exists()
    assert f"{w1['id']} adopted" in hive.log()
    os.kill(w1["pid"], signal.SIGKILL)  # not our child any more: only the health loop can notice
    wait_until(lambda: w1["id"] not in workers(hive), 5, "the health loop to drop the dead worker")
    assert "process is gone" in hive.log()

    kill_daemon(hive)  # `stop` with no daemon left still stops what it left behind
    done = hive.stop()
    assert not done["stopped"] and done["orphans_stopped"] == 1
    assert gone(w2["pid"]) and port_is_free("127.0.0.1", w2["port"])
    assert list((hive.home / "workers").iterdir()) == []


def test_refusals_happen_before_any_process(hive: Hive, tiny_model: Path, tmp_path: Path) -> None:
    err = hive.run("worker", "list").error
    assert err["code"] == "HIVE_NOT_RUNNING" and "rbee-hive daemon --detach" in err["hint"]
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    hive.start("--ram-factor", "100000", *PORTS)
    assert hive.run("worker", "spawn", "--model", "nope").error["code"] == "MODEL_NOT_FOUND"
    ram = hive.run("worker", "spawn", "--model", "tiny").error
    assert ram["code"] == "INSUFFICIENT_RAM"
    assert ram["details"]["required_mb"] > ram["details"]["available_mb"] > 0
    device = hive.run("worker", "spawn", "--model", "tiny", "--backend", "cuda").error
    assert device["code"] == "BACKEND_NOT_AVAILABLE", device
    asyncio.run(refuse_bad_bodies(hive))
    empty = write_empty_model(tmp_path / "empty.gguf")  # valid metadata, one weight: the runtime refuses
    hive.ok("models", "add", f"file:{empty}")
    failed = hive.run("worker", "spawn", "--model", "empty", "--wait").error
    assert failed["code"] == "MODEL_LOAD_FAILED" and "could not load" in failed["message"]
    assert "log_tail" in failed["details"]
    wait_until(lambda: not workers(hive), 10, "the failed worker to be stopped")
    assert hive.run("worker", "list").result["workers"] == []
    assert list((hive.home / "workers").iterdir()) == []


async def refuse_bad_bodies(hive: Hive) -> None:
    """The hive API parses each body once, at its edge: a bad field is a 400 naming it."""
    transport = httpx.AsyncHTTPTransport(uds=str(hive.home / "hive.sock"))
    async with httpx.AsyncClient(transport=transport, base_url="http://hive") as client:
        cases: list[tuple[str, Any, str]] = [
            ("/v1/workers/spawn", {"model": "tiny", "slots": 0}, "slots"),
            ("/v1/workers/spawn", {"model": "tiny", "backend": "gpu"}, "backend"),
            ("/v1/workers/spawn", {"model": "tiny", "ctx": "big"}, "ctx_size"),
            ("/v1/workers/spawn", {"model": "tiny", "gpu": 0}, "gpu"),
            ("/v1/workers/spawn", [1, 2], "body"),
            ("/v1/workers/ready", {"worker_id": "w", "state": "gone"}, "state"),
        ]
        for path, body, field in cases:
            response = await client.post(path, json=body)
            error = response.json()["error"]
            assert response.status_code == 400 and error["code"] == "INVALID_REQUEST", (body, error)
            assert error["details"]["field"] == field, (body, error)
        garbage = await client.post("/v1/workers/spawn", content=b"{not json")
        assert garbage.status_code == 400


def write_empty_model(path: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
