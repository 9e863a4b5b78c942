"""InventoryFleet's bookkeeping over the NodeClient interface: list, spawn, stop only what it started."""

from __future__ import annotations

import asyncio
from typing import Any

from rbee_control.queen import InventoryFleet
from rbee_worker.protocol.hive_api import DaemonInfo, ModelInfo, WorkerInfo
from rbee_worker.protocol.spawn import SpawnRequest


class RecordingNode:
    """Answers the NodeClient calls the fleet makes, as a node whose hive may already be running."""

    def __init__(
        self, name: str, *, hive_running: bool, models: list[dict[str, Any]] | None, delay: float = 0.2
    ):
        self.name = name
        self.hive_running = hive_running
        self.models = models
        self.delay = delay
        self.calls: list[str] = []
        self.in_flight: list[int] = [0, 0]  # [now, most at once], shared between nodes by the test

    async def hive_start(self) -> DaemonInfo:
        self.calls.append("hive_start")
        status = "already_running" if self.hive_running else "started"
        self.hive_running = True
        return DaemonInfo(status)

    async def hive_stop(self) -> dict[str, Any]:
        self.calls.append("hive_stop")
        return {"stopped": True}

    async def models_list(self, templates: bool = False) -> list[ModelInfo]:
        self.in_flight[0] += 1
        self.in_flight[1] = max(self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight[0] -= 1
        if self.models is None:
            raise ConnectionError(f"{self.name} is down")
        return [ModelInfo.from_json(row) for row in self.models]

    async def worker_spawn(self, req: SpawnRequest) -> WorkerInfo:
        self.calls.append(f"spawn {req.model}")
        n = sum(c.startswith("spawn") for c in self.calls)
        url = f"http://{self.name}:8081"
        return WorkerInfo(id=f"{self.name}-w{n}", url=url, model=req.model, state="idle", api_key="k")

    async def hive_tls(self) -> dict[str, Any]:
        raise AssertionError("only https workers need the hive's certificate")

    async def worker_stop(self, worker_id: str) -> dict[str, Any]:
        self.calls.append(f"stop {worker_id}")
        return {"id": worker_id}


async def test_lists_nodes_concurrently_and_skips_a_node_that_fails() -> None:
    row = {"name": "tiny", "sha256": "abc", "context_length": 4096, "chat_template": None, "size": 1}
    nodes = {
        "a": RecordingNode("a", hive_running=True, models=[row]),
        "b": RecordingNode(
            "b", hive_running=False, models=[{**row, "name": "big", "chat_template": "{{x}}"}]
        ),
        "down": RecordingNode("down", hive_running=False, models=None),
    }
    shared = [0, 0]
    for node in nodes.values():
        node.in_flight = shared
    fleet = InventoryFleet(nodes)
    entries = await fleet.list_models()
    assert shared == [0, 3], "all three nodes are asked at once"
    assert [(e.name, e.node, e.digest, e.context_length) for e in entries] == [
        ("tiny", "a", "abc", 4096),
        ("big", "b", "abc", 4096),
    ]
    assert entries[1].chat_template == "{{x}}"


async def test_spawns_through_the_hive_and_stops_only_what_it_started() -> None:
    closed = []

    async def on_close() -> None:
        closed.append(True)

    a = RecordingNode("a", hive_running=True, models=[])
    b = RecordingNode("b", hive_running=False, models=[])
    fleet = InventoryFleet({"a": a, "b": b}, on_close=on_close)
    first, second = await asyncio.gather(fleet.spawn("tiny", "a"), fleet.spawn("tiny", "a"))
    on_b = await fleet.spawn("big", "b")
    assert {first.id, second.id} == {"a-w1", "a-w2"} and on_b.node == "b" and on_b.api_key == "k"
    assert a.calls.count("hive_start") == 1  # concurrent spawns start the hive once
    await fleet.close()
    assert sorted(c for c in a.calls if c.startswith("stop")) == ["stop a-w1", "stop a-w2"]
    assert "hive_stop" not in a.calls  # it was running before the queen: left alone
    assert b.calls[-1] == "hive_stop" and "stop b-w1" in b.calls
    assert closed == [True]
