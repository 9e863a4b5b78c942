"""The queen in front of real nodes: two sshd nodes with their own hives, reached over SSH.

The queen is a real `queen-rbee` process with an inventory; the client is the
`openai` SDK. Models live in the nodes' catalogs only, so every first request is a
cold start through the SSH control plane, and SIGTERM must leave nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from rbee_worker.tinymodel import write_tiny_model
from tests import sshd
from tests.keeper.conftest import Fleet, _with_hive_env, build_fleet, rbee_processes, stop_fleet
from tests.worker_proc import free_port

sshd_factory = sshd.sshd_factory
QUEEN_KEY = "queen-test-key"


@dataclass
class QueenFleet:
    fleet: Fleet
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, key: str = QUEEN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def queen_fleet(
    tmp_path_factory: pytest.TempPathFactory, sshd_factory: sshd.SshdFactory, tiny_model: Path
) -> Iterator[QueenFleet]:
    base = tmp_path_factory.mktemp("queen-fleet")
    nodes = [_with_hive_env(sshd_factory.start(address)) for address in sshd.NODE_ADDRESSES]
    fleet = build_fleet(base, nodes)
    other = write_tiny_model(base / "other.gguf", seed=5)
    for ref, name, node in ((tiny_model, "tiny-a", "n2"), (other, "tiny-b", "n3")):
        added = fleet.keeper.run("models", "add", f"file:{ref}", "--name", name, "--node", node)
        assert added.rc == 0, str(added)
    port = free_port()
    log = base / "queen.log"
    env = {**fleet.keeper.env, "RBEE_QUEEN_API_KEY": QUEEN_KEY}
    argv = [sys.executable, "-m", "rbee_control.queen.cli", "--inventory", str(fleet.keeper.inventory)]
    with log.open("wb") as out:
        proc = subprocess.Popen([*argv, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    try:
        yield QueenFleet(fleet, url, proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_fleet(fleet.keeper, fleet.homes)


def test_models_of_every_node_are_listed(queen_fleet: QueenFleet) -> None:
    models = {m.id: m.owned_by for m in queen_fleet.client().models.list().data}
    assert models == {"tiny-a": "n2", "tiny-b": "n3"}


def test_cold_start_over_ssh_routes_each_model_to_its_node(queen_fleet: QueenFleet) -> None:
    client = queen_fleet.client()
    reply = client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=12, seed=1
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    stream = client.completions.create(model="tiny-b", prompt="the hive", max_tokens=10, seed=2, stream=True)
    chunks = [chunk for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks)

    listing = queen_fleet.fleet.keeper.run("worker", "list", json_mode=True)
    assert listing.rc == 0, str(listing)
    workers = listing.json()
    assert [w["model"] for w in workers["n2"]] == ["tiny-a"]
    assert [w["model"] for w in workers["n3"]] == ["tiny-b"]
    assert workers["local"] == []
    assert all("api_key" not in w for ws in workers.values() for w in ws)


def test_wrong_key_is_refused(queen_fleet: QueenFleet) -> None:
    with pytest.raises(openai.AuthenticationError):
        queen_fleet.client("wrong").models.list()


def test_sigterm_stops_what_the_queen_started(queen_fleet: QueenFleet) -> None:
    assert rbee_processes(queen_fleet.fleet.homes), "the cold starts should have left hives and workers"
    queen_fleet.proc.send_signal(signal.SIGTERM)
    assert queen_fleet.proc.wait(90) == 0, queen_fleet.log.read_text()
    deadline = time.monotonic() + 20
    while rbee_processes(queen_fleet.fleet.homes) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [" ".join(p.cmdline()) for p in rbee_processes(queen_fleet.fleet.homes)]
    assert not left, f"still running after the queen stopped: {left}"
    assert os.path.exists(queen_fleet.log)
