"""`GET /v2/dashboard` and `/ui/` on a real queen with a real tiny-model worker (no browser here).

The browser drives the same queen in test_dashboard_ui.py; this file checks the
document's content, the key rules and what the static pages give away without a key.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rbee_control.queen import InventoryFleet
from rbee_control.queen.recent import RecentRequests, RecentSeen
from rbee_control.queen.ui_routes import CSP

from ..worker_proc import WorkerProcess
from .conftest import ADMIN_KEY, QUEEN_KEY, serve_queen, start_worker

MODEL = "tiny-dash"
NODE = "hall-pc"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[WorkerProcess]:
    proc = start_worker(tiny_model, tmp_path_factory.mktemp("dash"), ctx=2048)
    try:
        yield proc
    finally:
        proc.kill()


def _seen(ring: RecentRequests, worker: str, tokens: int, decode_ms: float) -> None:
    ring.add(RecentSeen(tokens, decode_ms).request(ring.next_seq(), "chat", "m", "n", worker, "ok", 0.0))


def test_the_ring_keeps_only_the_newest_requests() -> None:
    ring = RecentRequests(size=3)
    for n in range(5):
        _seen(ring, f"w{n}", tokens=10, decode_ms=100)
    assert len(ring) == 3
    assert [r.worker for r in ring.latest()] == ["w4", "w3", "w2"]
    assert [r.seq for r in ring.latest(2)] == [5, 4]
    assert ring.latest(0) == []


def test_a_workers_speed_is_its_latest_request_that_generated() -> None:
    ring = RecentRequests()
    _seen(ring, "a", tokens=50, decode_ms=1000)
    _seen(ring, "a", tokens=0, decode_ms=0)  # an error before the first token: no speed
    _seen(ring, "b", tokens=5, decode_ms=1000)
    assert ring.worker_rate("a") == 50.0
    assert ring.worker_rate("b") == 5.0
    assert ring.worker_rate("c") is None
    with pytest.raises(ValueError):
        RecentRequests(size=0)


async def test_dashboard_shows_the_worker_and_the_requests_it_served(worker: WorkerProcess) -> None:
    async with serve_queen() as queen:
        await queen.register(worker, MODEL, node=NODE)
        async with queen.admin() as admin:
            before = (await admin.get("/v2/dashboard")).json()
        assert before["requests"] == []
        [shown] = before["workers"]
        assert (shown["node"], shown["model"], shown["busy"], shown["slots"]) == (NODE, MODEL, 0, 1)
        assert shown["tokens_per_s"] is None and shown["idle_s"] >= 0
        assert "api_key" not in shown and worker.api_key not in str(before)
        assert [n["name"] for n in before["nodes"]] == [NODE]
        assert before["nodes"][0]["source"] == "registration"
        assert [(m["name"], m["node"], m["loaded"]) for m in before["models"]] == [(MODEL, NODE, True)]

        client = queen.openai()
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
        async for _chunk in stream:
            pass
        async with queen.http() as http:
            absent = {"model": "absent", "messages": [{"role": "user", "content": "hi"}]}
            assert (await http.post("/v1/chat/completions", json=absent)).status_code == 404
        async with queen.admin() as admin:
            after = (await admin.get("/v2/dashboard")).json()
            limited = (await admin.get("/v2/dashboard", params={"requests": "1"})).json()

    newest, streamed, collected = after["requests"]
    assert (newest["outcome"], newest["model"], newest["worker"]) == ("error", "-", "-")
    assert newest["error"]
    for record in (streamed, collected):
        assert (record["route"], record["model"], record["node"]) == ("chat", MODEL, NODE)
        assert record["worker"] == shown["id"] and record["outcome"] == "ok"
        assert record["tokens"] > 0 and record["tokens_per_s"] > 0 and record["ttft_ms"] is not None
    assert streamed["seq"] > collected["seq"]
    assert limited["requests"] == [newest]
    [served] = after["workers"]
    assert served["served"] == 2 and served["tokens_per_s"] == streamed["tokens_per_s"]


async def test_dashboard_takes_only_the_admin_key(worker: WorkerProcess) -> None:
    async with serve_queen() as queen:
        await queen.register(worker, MODEL)
        async with httpx.AsyncClient(base_url=queen.url) as anon:
            missing = await anon.get("/v2/dashboard")
            wrong = await anon.get("/v2/dashboard", headers={"Authorization": "Bearer nope"})
        async with queen.http() as client_plane:
            client_key = await client_plane.get("/v2/dashboard")
        async with queen.admin() as admin:
            bad_limit = await admin.get("/v2/dashboard", params={"requests": "lots"})
            too_many = await admin.get("/v2/dashboard", params={"requests": "100000"})
    assert (missing.status_code, wrong.status_code, client_key.status_code) == (401, 401, 403)
    for refused in (missing, wrong, client_key):
        assert MODEL not in refused.text and worker.url not in refused.text
    for bad in (bad_limit, too_many):
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "requests"


async def test_ui_files_are_served_without_a_key_and_hold_no_fleet_data(worker: WorkerProcess) -> None:
    async with serve_queen() as queen:
        await queen.register(worker, MODEL, node=NODE)
        async with httpx.AsyncClient(base_url=queen.url) as anon:
            bare = await anon.get("/ui")
            page = await anon.get("/ui/")
            script = await anon.get("/ui/app.js")
            style = await anon.get("/ui/style.css")
            absent = await anon.get("/ui/secrets.json")
            other_host = await anon.get("/ui/", headers={"Host": "rebound.example"})
        # raw request lines: an HTTP client would resolve the dots before sending
        climbing = await _raw_get(queen.url, "/ui/%2e%2e/v2/dashboard")
        dotted = await _raw_get(queen.url, "/ui/../v2/workers/list")
    assert bare.status_code == 308 and bare.headers["location"] == "/ui/"
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    for response in (page, script, style):
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-content-type-options"] == "nosniff"
        for secret in (MODEL, NODE, worker.url, QUEEN_KEY, ADMIN_KEY):
            assert secret not in response.text
    assert "<script>" not in page.text and "style=" not in page.text  # the CSP allows no inline code
    assert absent.status_code == 404
    for raw in (climbing, dotted):
        assert raw.startswith("HTTP/1.1 404 "), raw
        assert MODEL not in raw
    assert other_host.status_code == 400  # the Host allow-list guards the pages too


async def _raw_get(base: str, target: str) -> str:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer.decode()


async def _checked(admin: httpx.AsyncClient) -> dict:
    """The dashboard once the nodes were asked (a poll waits a few seconds for the first answer)."""
    for _ in range(20):
        response = await admin.get("/v2/dashboard")
        assert response.status_code == 200, response.text
        if response.json()["queen"]["nodes_checked_at"] is not None:
            return response.json()
    raise AssertionError("the nodes' status never arrived")


async def test_inventory_nodes_show_their_devices_and_free_memory(tmp_path: Path) -> None:
    """A real `rbee-hive status` on local nodes: the device data `rbee-hive detect` gives, or why not."""
    blocker = tmp_path / "file"  # a home the hive cannot create: that node's status fails
    blocker.write_text("")
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "nodes:\n"
        f"  here:\n    transport: local\n    home: {tmp_path / 'home'}\n"
        f"  broken:\n    transport: local\n    home: {blocker / 'home'}\n"
    )
    async with serve_queen(InventoryFleet.from_inventory(inventory)) as queen, queen.admin() as admin:
        body = await _checked(admin)
    broken, node = body["nodes"]
    assert (node["name"], node["source"], node["error"]) == ("here", "hive", None)
    assert node["hostname"] == socket.gethostname() and node["hive_running"] is False
    assert node["ram_total_bytes"] > 0 and 0 < node["ram_free_bytes"] <= node["ram_total_bytes"]
    cpu = next(d for d in node["devices"] if d["backend"] == "cpu")
    assert 0 < cpu["memory_free_bytes"] <= cpu["memory_total_bytes"]
    assert broken["name"] == "broken" and "Not a directory" in broken["error"] and broken["devices"] == []
