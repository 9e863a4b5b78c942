"""Stream and listing details clients trip on: keep-alive comments, line separators, cached listings.

- A stream waiting for a worker (a cold start held at a gate, a queue behind a
  busy slot) is answered at once and sent `: ping` comments until the worker's
  stream commits; the official SDK reads through them; a failure after that is an
  in-stream error followed by `[DONE]`. The interval is 0.05 s here; nothing
  asserts how long anything took.
- Every streamed JSON writer escapes U+2028, U+2029 and U+0085.
- `/v1/models` keeps listing a node's models while its sshd is stopped, and
  `GET /v1/models/{id}` answers known ids and 404s unknown ones in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from rbee_control.queen import ModelEntry, QueenSettings, WorkerEntry
from rbee_control.queen.errors import sse_error
from rbee_control.queen.inventory_fleet import InventoryFleet
from rbee_control.queen.ollama_api import ndjson
from rbee_control.queen.openai_api import Shapes
from rbee_worker.protocol import events, jsontext
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from tests import sshd

from ..worker_proc import WorkerProcess
from .conftest import serve_queen

FAST_PINGS = QueenSettings(sse_keepalive=0.05)
LONG = {"model": "gated", "prompt": "the hive", "max_tokens": 16000, "seed": 1, "stream": True}
SHORT = {"model": "gated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
sshd_factory = sshd.sshd_factory


class GatedFleet:
    """Starts a real worker only once `gate` opens (or fails then, with `fail`)."""

    def __init__(self, model: Path, factory: type[WorkerProcess], fail: bool = False) -> None:
        self.model = model
        self.factory = factory
        self.fail = fail
        self.gate = asyncio.Event()
        self.spawns = 0
        self.workers: list[WorkerProcess] = []

    async def list_models(self) -> list[ModelEntry]:
        return [ModelEntry("gated", "local", context_length=16384)]

    async def spawn(self, model: str, node: str) -> WorkerEntry:
        self.spawns += 1
        await self.gate.wait()
        if self.fail:
            raise RbeeError(ErrorCode.MODEL_LOAD_FAILED, "the gated node could not load it")

        def start() -> WorkerProcess:
            worker = self.factory(self.model, ctx=16384)
            worker.wait_ready()
            return worker

        worker = await asyncio.to_thread(start)
        self.workers.append(worker)
        return WorkerEntry(f"gated-{self.spawns}", node, worker.url, worker.api_key, model)

    async def stop_worker(self, entry: WorkerEntry) -> None:
        return None

    async def close(self) -> None:
        return None


async def read_until(chunks: AsyncIterator[bytes], marker: bytes, seen: bytes = b"") -> bytes:
    while marker not in seen:
        seen += await anext(chunks)
    return seen


async def test_a_cold_start_and_a_queue_are_kept_alive_with_comments(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    fleet = GatedFleet(tiny_model, worker_factory)
    async with serve_queen(fleet, settings=FAST_PINGS) as queen:
        client = queen.openai()
        # The SDK has its 200 while the worker does not exist yet, and reads through the pings.
        stream = await client.chat.completions.create(
            model="gated", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        assert fleet.spawns == 1 and fleet.workers == []
        fleet.gate.set()
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        async with queen.http() as http, http.stream("POST", "/v1/completions", json=LONG) as running:
            # kept in a name: a dropped iterator is finalized, and that closes the stream
            long_body = aiter(running.aiter_bytes())
            await read_until(long_body, b'"text"')  # it holds the one slot
            async with http.stream("POST", "/v1/chat/completions", json=SHORT) as queued:
                assert queued.status_code == 200
                body = aiter(queued.aiter_bytes())
                head = await read_until(body, b": ping\n\n")
                assert b"data:" not in head
                await running.aclose()  # the long one goes away; the queued one gets its slot
                whole = head + b"".join([chunk async for chunk in body])
        assert whole.index(b": ping") < whole.index(b"data: {") < whole.index(b"data: [DONE]")
        assert fleet.spawns == 1


async def test_a_cold_start_failing_after_the_pings_is_an_in_stream_error(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    fleet = GatedFleet(tiny_model, worker_factory, fail=True)
    async with serve_queen(fleet, settings=FAST_PINGS) as queen, queen.http() as http:
        async with http.stream("POST", "/v1/chat/completions", json=SHORT) as response:
            assert response.status_code == 200
            body = aiter(response.aiter_bytes())
            head = await read_until(body, b": ping\n\n")
            fleet.gate.set()
            whole = head + b"".join([chunk async for chunk in body])
        data = [line[6:] for line in whole.split(b"\n") if line.startswith(b"data: ")]
        assert data[-1] == b"[DONE]"
        assert json.loads(data[-2])["error"]["message"] == "the gated node could not load it"
        # Before the first interval the answer keeps its status (here: the remembered failure).
        again = await http.post("/v1/chat/completions", json=SHORT)
        assert again.status_code == 500 and again.json()["error"]["code"] == "MODEL_LOAD_FAILED"


def test_the_keepalive_interval_is_a_queen_flag() -> None:
    from rbee_control.queen.cli import main

    assert main(["--no-inventory", "--sse-keepalive", "0"]) == 2


SEPARATORS = "a\u2028b\u2029c\x85d"


def _lines(data: bytes) -> list[str]:
    """Non-empty lines as `str.splitlines` (and so httpx's `aiter_lines`) cuts them."""
    return [line for line in data.decode().splitlines() if line]


def test_every_stream_writer_escapes_line_separators() -> None:
    for kind in ("chat", "completion"):
        shapes = Shapes(kind, "id", "model", include_usage=True)  # type: ignore[arg-type]
        chunk = shapes.text_chunk(SEPARATORS)
        assert len(_lines(chunk)) == 1
        assert json.loads(chunk[6:])["choices"][0]["delta" if kind == "chat" else "text"]
    event = events.encode_event(events.TOKEN, {"t": SEPARATORS, "i": 0})
    assert len(_lines(event)) == 2  # `event:` and `data:`, nothing cut
    parsed = events.EventParser().feed(event)
    assert parsed[0][1].data["t"] == SEPARATORS
    error = sse_error(RbeeError(ErrorCode.INFERENCE_FAILED, SEPARATORS))
    assert len(_lines(error)) == 1 and json.loads(error[6:])["error"]["message"] == SEPARATORS
    line = ndjson({"response": SEPARATORS})
    assert len(_lines(line)) == 1 and json.loads(line)["response"] == SEPARATORS
    assert json.loads(jsontext.dumps({"k": SEPARATORS})) == {"k": SEPARATORS}
    assert "\u2028" not in jsontext.dumps(SEPARATORS) and "é" in jsontext.dumps("é")


# --- /v1/models while a node is asleep -------------------------------------------------


@pytest.fixture
def sleepy_node(
    sshd_factory: sshd.SshdFactory, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, sshd.SshdNode]:
    """An inventory with one sshd node (its own address) whose catalog holds `tiny-a`."""
    node = sshd_factory.start("127.0.0.7")
    config = tmp_path / "config"
    monkeypatch.setenv("RBEE_CONFIG_DIR", str(config))
    sshd.trust_nodes(config, [node])
    inventory = sshd.write_inventory(
        tmp_path / "inventory.yaml", {"n7": node}, tmp_path / "homes", local_node=None, venv=Path(sys.prefix)
    )
    home = tmp_path / "homes" / "n7"
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "rbee_control.hive.cli",
            "models",
            "add",
            f"file:{tiny_model}",
            "--name",
            "tiny-a",
        ],
        env={**os.environ, "RBEE_HOME": str(home)},
        capture_output=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    return inventory, node


async def test_the_model_listing_outlives_a_node_going_to_sleep(
    sleepy_node: tuple[Path, sshd.SshdNode], caplog: pytest.LogCaptureFixture
) -> None:
    inventory, node = sleepy_node
    fleet = InventoryFleet.from_inventory(inventory)
    async with serve_queen(fleet, settings=QueenSettings(catalog_ttl=0)) as queen:
        client = queen.openai()
        assert [m.id for m in (await client.models.list()).data] == ["tiny-a"]
        node.stop()
        try:
            # Stale at once (ttl 0): served from the cache while a refresh fails behind it, and
            # after that refresh the node's last listing still stands.
            for _ in range(3):
                assert [m.id for m in (await client.models.list()).data] == ["tiny-a"]
                refresh = queen.state.catalog._refreshing
                if refresh is not None:
                    await asyncio.wait({refresh})
            assert "node n7: listing models failed" in caplog.text  # the refreshes did fail
            model = await client.models.retrieve("tiny-a")
            assert (model.id, model.owned_by, model.object) == ("tiny-a", "n7", "model")
            pinned = await client.models.retrieve("n7/tiny-a")
            assert pinned.id == "n7/tiny-a"
            with pytest.raises(openai.NotFoundError) as caught:
                await client.models.retrieve("nope")
            error = caught.value.body
            assert (
                isinstance(error, dict) and error["param"] == "model" and error["type"] == "not_found_error"
            )
            async with queen.http() as http:
                assert (await http.get("/v1/models/nope")).json()["error"]["code"] == "MODEL_NOT_FOUND"
                unauthorized = await httpx.AsyncClient(base_url=queen.url).get("/v1/models/tiny-a")
                assert unauthorized.status_code == 401
        finally:
            node.start()
