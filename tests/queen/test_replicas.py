"""Replicas on demand: a real queen over two sshd nodes and `local`, only n2 holding the tiny model.

The inventory says `replicas: {max: 2}` and where the model comes from (`source:` an
HTTP server on loopback, with its sha256); a burst of concurrent requests makes one
request wait past `--scale-after`, the queen has the other node fetch the model and
starts a second worker there, both serve, and the extra one is stopped once idle.
Thresholds are tiny so the test is quick; nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import sshd
from tests.hive.servers import FileServer, serve_in_thread
from tests.keeper.conftest import Fleet, _with_hive_env, build_fleet, stop_fleet
from tests.waiting import wait_for
from tests.worker_proc import free_port

sshd_factory = sshd.sshd_factory
QUEEN_KEY = "queen-test-key"
ADMIN_KEY = "queen-admin-key"
BURSTS = 6  # bound on bursts sent while waiting for the second replica
BURST = 6
BURST_TOKENS = 1000


@dataclass
class Queen:
    fleet: Fleet
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    files: FileServer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=QUEEN_KEY, timeout=120, max_retries=0)

    def workers(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        return dict(httpx.get(f"{self.url}/v2/workers/list", headers=headers, timeout=10).json())


@pytest.fixture(scope="module")
def queen(
    tmp_path_factory: pytest.TempPathFactory, sshd_factory: sshd.SshdFactory, tiny_model: Path
) -> Iterator[Queen]:
    base = tmp_path_factory.mktemp("replicas")
    nodes = [_with_hive_env(sshd_factory.start(address)) for address in sshd.NODE_ADDRESSES]
    fleet = build_fleet(base, nodes)
    files = FileServer()
    served = contextlib.ExitStack()
    files.url = served.enter_context(serve_in_thread(files.app()))
    source = files.add("tiny.gguf", tiny_model)
    digest = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    with fleet.keeper.inventory.open("a") as f:
        f.write("models:\n  tiny:\n    replicas: {min: 0, max: 2}\n")
        f.write(f"    source: {source}\n    sha256: {digest}\n")
    added = fleet.keeper.run("models", "add", f"file:{tiny_model}", "--name", "tiny", "--node", "n2")
    assert added.rc == 0, str(added)
    port = free_port()
    log = base / "queen.log"
    env = {**fleet.keeper.env, "RBEE_QUEEN_API_KEY": QUEEN_KEY, "RBEE_QUEEN_ADMIN_KEY": ADMIN_KEY}
    argv = [
        sys.executable, "-m", "rbee_control.queen.cli", "--inventory", str(fleet.keeper.inventory),
        "--port", str(port), "--scale-after", "0.05", "--replica-idle-timeout", "5",
        "--replica-interval", "0.3",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url) or proc.poll() is not None, 30, "queen up")
        assert proc.poll() is None, log.read_text()
        yield Queen(fleet, url, proc, log, files)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(90)
        stop_fleet(fleet.keeper, fleet.homes)
        served.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def burst(queen: Queen) -> list[str]:
    client = queen.client()

    def one(i: int) -> str:
        # long enough that a queue forms behind one worker on a fast machine (the tiny model's
        # end-of-stream token, id 2, is banned so none ends early)
        reply = client.completions.create(
            model="tiny", prompt=f"burst {i}", max_tokens=BURST_TOKENS, seed=i, logit_bias={"2": -100}
        )
        return reply.choices[0].text

    with ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(one, range(BURST)))


def tokens_by_node(queen: Queen) -> dict[str, float]:
    """`rbee_queen_tokens_total` per node: outlives the workers, so a retired replica still counts."""
    text = httpx.get(
        f"{queen.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("rbee_queen_tokens_total{") and 'model="tiny"' in line:
            node = line.split('node="', 1)[1].split('"', 1)[0]
            found[node] = float(line.rsplit(" ", 1)[1])
    return found


def test_a_burst_adds_a_replica_both_serve_and_the_extra_one_retires(queen: Queen) -> None:
    assert all(burst(queen))  # the cold start, then a queue behind one worker
    for _ in range(BURSTS):  # bounded: until a queued request asked for a second replica
        if "starting replica 2 of at most 2" in queen.log.read_text():
            break
        assert all(burst(queen))
    assert "starting replica 2 of at most 2" in queen.log.read_text(), queen.log.read_text()[-3000:]
    wait_for(lambda: queen.workers()["replicas"].get("tiny", {}).get("workers") == 2, 120, "second replica")
    listing = queen.workers()["replicas"]["tiny"]
    assert "n2" in listing["nodes"] and listing["max"] == 2 and listing["min"] == 0, listing
    # the other node (n3, or the inventory's `local`) had no copy: it fetched one from the source,
    # checked against the sha256
    (other,) = [n for n in listing["nodes"] if n != "n2"]
    assert f"{other}: fetching tiny from http://127.0.0.1:" in queen.log.read_text()
    assert [r.method for r in queen.files.requests_for("tiny.gguf")].count("GET") >= 1
    catalog = queen.fleet.keeper.run("models", "list", "--node", other, json_mode=True)
    assert catalog.rc == 0 and "tiny" in catalog.out, str(catalog)

    for _ in range(BURSTS):  # both serve: least busy routing spreads a burst over the two
        if all(tokens_by_node(queen).get(n, 0) > 0 for n in ("n2", other)):
            break
        assert all(burst(queen))
    tokens = tokens_by_node(queen)
    assert tokens.get("n2", 0) > 0 and tokens.get(other, 0) > 0, (tokens, queen.log.read_text()[-3000:])

    wait_for(lambda: queen.workers()["replicas"].get("tiny", {}).get("workers") == 1, 60, "extra retired")
    assert "retiring" in queen.log.read_text()
    # and on the nodes: one worker left in all (the retired one was stopped, not just forgotten)
    wait_for(lambda: tiny_workers_on_nodes(queen) == 1, 30, "one tiny worker on the nodes")


def tiny_workers_on_nodes(queen: Queen) -> int:
    listing = queen.fleet.keeper.run("worker", "list", json_mode=True)
    assert listing.rc == 0, str(listing)
    return sum(1 for ws in listing.json().values() for w in ws if w["model"] == "tiny")
