"""One model over three nodes through llama.cpp's RPC backend, driven by the real keeper CLI.

Three `transport: local` nodes (each its own home) on this machine: `a` runs the
split worker, `b` and `c` each run a `ggml-rpc-server` for it. The tiny model's
answer at temperature 0 must not change when its layers move to the RPC servers,
and every way the split ends leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee_control.hive.rpc_servers import find_binary
from rbee_control.node.split import check_split
from rbee_worker.model_shape import read_model_shape
from rbee_worker.protocol.client import WorkerClient
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.request import InferenceRequest
from rbee_worker.runtimes.rpc_devices import has_rpc

from ..waiting import wait_for
from .conftest import Keeper, make_keeper, stop_fleet

pytestmark = pytest.mark.llama

FAST = {
    "RBEE_HIVE_HEALTH_INTERVAL": "0.3",
    "RBEE_HIVE_POLL_INTERVAL": "0.2",
    "RBEE_HIVE_RPC_GRACE": "3",
    "RBEE_HIVE_STOP_TIMEOUT": "2",
}


def start_fleet(base: Path, tiny_model: Path, **env: str) -> tuple[Keeper, Path]:
    """Nodes a, b, c (`transport: local`, each its own home) and the tiny model on a."""
    if not has_rpc():
        pytest.fail("llama-cpp-python has no RPC backend: run scripts/setup.sh")
    find_binary()  # raises with the install hint when ggml-rpc-server is missing
    homes = base / "homes"
    lines = ["nodes:"]
    for name in ("a", "b", "c"):
        (homes / name).mkdir(parents=True)
        lines += [f"  {name}:", "    transport: local", f"    home: '{homes / name}'"]
    inventory = base / "inventory.yaml"
    inventory.write_text("\n".join(lines) + "\n")
    binary = {"RBEE_RPC_SERVER": os.environ["RBEE_RPC_SERVER"]} if os.environ.get("RBEE_RPC_SERVER") else {}
    keeper = make_keeper(base, inventory, **FAST, **binary, **env)
    added = keeper.run("models", "add", f"file:{tiny_model}", "--node", "a", "--name", "tiny")
    assert added.rc == 0, added
    return keeper, homes


@pytest.fixture(scope="module")
def split_fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[Keeper, Path]]:
    keeper, homes = start_fleet(tmp_path_factory.mktemp("split"), tiny_model)
    try:
        yield keeper, homes
    finally:
        stop_fleet(keeper, homes)


def hive_workers(home: Path) -> dict[str, dict[str, Any]]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(home / "hive.sock")), timeout=10) as client:
        return {w["id"]: w for w in client.get("http://hive/v1/workers/list").json()["workers"]}


def rpc_servers(home: Path) -> list[dict[str, Any]]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(home / "hive.sock")), timeout=10) as client:
        return list(client.get("http://hive/v1/rpc/list").json()["servers"])


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def answer(worker: dict[str, Any], prompt: str) -> str:
    request = InferenceRequest(prompt=prompt, max_tokens=24, temperature=0.0, seed=1)
    async with (
        WorkerClient(worker["url"], worker["api_key"]) as client,
        await client.stream(request) as stream,
    ):
        events = [e async for e in stream.events()]
    assert events[-1].name == "end", events
    return "".join(e.data["t"] for e in events if e.name == "token")


def spawn(keeper: Keeper, *extra: str) -> dict[str, Any]:
    run = keeper.run("worker", "spawn", "--node", "a", "--model", "tiny", *extra, json_mode=True, timeout=120)
    assert run.rc == 0, str(run)
    return dict(run.json())


def test_split_answers_like_the_whole_model_and_stops_clean(split_fleet: tuple[Keeper, Path]) -> None:
    keeper, homes = split_fleet
    split = spawn(keeper, "--split", "b,c")
    assert [s["node"] for s in split["split"]] == ["b", "c"] and split["rpc_servers"], split
    servers = {n: rpc_servers(homes / n) for n in ("b", "c")}
    assert all(len(s) == 1 for s in servers.values()), servers
    assert all(s[0]["endpoint"].startswith("127.0.0.1:") for s in servers.values())  # the node's address
    whole = spawn(keeper)
    workers = hive_workers(homes / "a")
    for worker, layers in ((workers[split["id"]], 3), (workers[whole["id"]], 0)):  # 2 blocks + the head
        headers = {"Authorization": f"Bearer {worker['api_key']}"}
        ready = httpx.get(f"{worker['url']}/v1/ready", headers=headers, timeout=10).json()
        assert ready["gpu_layers"] == layers, ready
    assert workers[split["id"]]["rpc_servers"] == [s[0]["endpoint"] for s in servers.values()]

    status = keeper.run("status")
    assert status.rc == 0, status
    assert "split a + b, c" in status.out, status

    prompts = ["The capital of", "once upon a time", "1, 2, 3,"]
    for prompt in prompts:
        texts = [asyncio.run(answer(workers[w["id"]], prompt)) for w in (split, whole)]
        assert texts[0] == texts[1] and texts[0], (prompt, texts)

    # stop: the worker first, then its RPC servers, and nothing of them is left
    stopped = keeper.run("worker", "stop", split["id"], "--node", "a")
    assert stopped.rc == 0, stopped
    pids = [s[0]["pid"] for s in servers.values()]
    wait_for(lambda: not any(alive(p) for p in pids), 20, "rpc servers gone")
    assert rpc_servers(homes / "b") == rpc_servers(homes / "c") == []
    assert keeper.run("worker", "stop", whole["id"], "--node", "a").rc == 0


def test_a_model_too_big_for_its_node_runs_split(tmp_path: Path, tiny_model: Path) -> None:
    """Node a's RAM check made to refuse the whole model (the hive's --ram-factor), not the split.

    The factor scales the weights a node must hold: the whole model then needs about twice a's
    free memory, while a split leaves a only the token embedding (a sixth of the tiny model).
    """
    shape = read_model_shape(str(tiny_model))
    factor = 2 * psutil.virtual_memory().available / shape.weights_bytes
    assert shape.host_bytes * factor < psutil.virtual_memory().available / 2  # the split's share fits
    keeper, homes = start_fleet(tmp_path, tiny_model, RBEE_HIVE_RAM_FACTOR=f"{factor:.0f}")
    try:
        whole = keeper.run("worker", "spawn", "--node", "a", "--model", "tiny", timeout=120)
        assert whole.rc == 1 and "insufficient RAM" in whole.err, whole
        split = spawn(keeper, "--split", "b,c")
        worker = hive_workers(homes / "a")[split["id"]]
        ready = httpx.get(
            f"{worker['url']}/v1/ready", headers={"Authorization": f"Bearer {worker['api_key']}"}, timeout=10
        ).json()
        assert ready["gpu_layers"] == shape.n_layers + 1, ready  # every layer and the head on b and c
        assert asyncio.run(answer(worker, "The capital of"))
    finally:
        stop_fleet(keeper, homes)


def test_a_lost_rpc_server_stops_the_split_worker_clean(split_fleet: tuple[Keeper, Path]) -> None:
    keeper, homes = split_fleet
    split = spawn(keeper, "--split", "b,c")
    worker_pid = hive_workers(homes / "a")[split["id"]]["pid"]
    (b_server,) = rpc_servers(homes / "b")
    (c_server,) = rpc_servers(homes / "c")
    os.kill(b_server["pid"], signal.SIGKILL)  # node b's server dies

    wait_for(lambda: split["id"] not in hive_workers(homes / "a"), 30, "split worker stopped")
    wait_for(lambda: not alive(worker_pid), 20, "split worker process gone")
    log = (homes / "a" / "logs" / "hive.log").read_text()
    assert f"RPC server {b_server['endpoint']} is gone; stopping the split worker" in log, log[-2000:]
    # c's server lost its client: its hive stops it after the grace period
    wait_for(lambda: not alive(c_server["pid"]), 30, "c's rpc server gone")
    assert rpc_servers(homes / "c") == []


def test_a_split_over_unknown_or_repeated_nodes_is_refused(split_fleet: tuple[Keeper, Path]) -> None:
    """Refused before any connection (a dead endpoint: the hive refuses it, test_rpc_refusals.py)."""
    keeper, homes = split_fleet
    run = keeper.run("worker", "spawn", "--node", "a", "--model", "tiny", "--split", "b,nowhere")
    assert run.rc == 1 and "unknown node 'nowhere'" in run.err, run
    with pytest.raises(RbeeError, match="named twice"):
        check_split("a", ["b", "b"])
    with pytest.raises(RbeeError, match="at least one helper"):
        check_split("a", [])
    assert rpc_servers(homes / "b") == [] and hive_workers(homes / "a") == {}


def test_the_queen_fleet_honours_a_split_placement(split_fleet: tuple[Keeper, Path], tmp_path: Path) -> None:
    """Inventory `models: {tiny: {node: a, split: [b]}}`: the queen's cold start makes a split worker."""
    from rbee_control.queen.inventory_fleet import InventoryFleet

    keeper, homes = split_fleet
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(keeper.inventory.read_text() + "models:\n  tiny: {node: a, split: [b]}\n")
    fleet = InventoryFleet.from_inventory(inventory)

    async def cold_start() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        try:
            entry = await fleet.spawn("tiny", "a")
            worker = hive_workers(homes / "a")[entry.id]
            servers = rpc_servers(homes / "b")
            assert await answer(worker, "hello")
        finally:
            await fleet.close()  # the worker first, then its RPC server
        return worker, servers

    worker, servers = asyncio.run(cold_start())
    assert worker["rpc_servers"] == [servers[0]["endpoint"]], (worker, servers)
    assert hive_workers(homes / "a") == {} and rpc_servers(homes / "b") == []
    assert not alive(servers[0]["pid"]) and not alive(worker["pid"])
