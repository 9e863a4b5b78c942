"""Embeddings through the queen: cold start of an `--embedding` worker, the `openai` and `ollama` clients.

The fleet starts real worker processes (the tiny model, a 64-token context),
for embeddings when the router asks for them; a chat request for the same model
gets a worker of its own. A queen that cannot start workers answers embeddings
for a model served only for text with a 400 that says so.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from rbee_control.queen import ModelEntry, WorkerEntry

from ..worker_proc import WorkerProcess
from .conftest import QUEEN_KEY, Queen, serve_queen

CTX = 64
TEXTS = ["the hive hums", "a queen bee"]


class SpawningFleet:
    """Starts `rbee-worker` processes on demand, with `--embedding` when asked; remembers each spawn."""

    def __init__(self, model: Path, factory: type[WorkerProcess]) -> None:
        self.model = model
        self.factory = factory
        self.spawned: list[bool] = []
        self.workers: list[WorkerProcess] = []

    async def list_models(self) -> list[ModelEntry]:
        return [ModelEntry("emb", "local", context_length=CTX)]

    async def spawn(self, model: str, node: str, *, embedding: bool = False) -> WorkerEntry:
        self.spawned.append(embedding)

        def start() -> WorkerProcess:
            worker = self.factory(self.model, ctx=CTX, extra=["--embedding"] if embedding else [])
            worker.wait_ready()
            return worker

        worker = await asyncio.to_thread(start)
        self.workers.append(worker)
        return WorkerEntry(f"w{len(self.spawned)}", node, worker.url, worker.api_key, model)

    async def stop_worker(self, entry: WorkerEntry) -> None:
        return None

    async def close(self) -> None:
        return None


def ollama_client(queen: Queen) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=queen.url, headers={"Authorization": f"Bearer {QUEEN_KEY}"}, timeout=60)


async def test_embeddings_cold_start_a_worker_of_their_own_and_answer_both_clients(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    fleet = SpawningFleet(tiny_model, worker_factory)
    async with serve_queen(fleet) as queen:
        client = queen.openai()
        packed = await client.embeddings.create(model="emb", input=TEXTS)  # the SDK's default: base64
        plain = await client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
        assert fleet.spawned == [True] and packed.model == plain.model == "emb"
        vectors = [d.embedding for d in plain.data]
        assert [d.embedding for d in packed.data] == [pytest.approx(v, abs=1e-6) for v in vectors]
        assert plain.usage.prompt_tokens > 0
        worker = fleet.workers[0]
        async with worker.async_client() as direct:
            own = (await direct.post("/v1/embeddings", json={"input": TEXTS})).json()
        assert [d["embedding"] for d in own["data"]] == [pytest.approx(v, abs=1e-6) for v in vectors]

        api = ollama_client(queen)
        embedded = await api.embed(model="emb", input=TEXTS)
        assert embedded.model == "emb" and embedded.prompt_eval_count == plain.usage.prompt_tokens
        assert [list(e) for e in embedded.embeddings] == [pytest.approx(v, abs=1e-6) for v in vectors]
        one = await api.embed(model="emb:latest", input=TEXTS[1])
        assert list(one.embeddings[0]) == pytest.approx(vectors[1], abs=1e-6)
        legacy = await api.embeddings(model="emb", prompt=TEXTS[0])
        assert list(legacy.embedding) == pytest.approx(vectors[0], abs=1e-6)

        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="emb", input=["fine", "bee " * 100])
        error = caught.value.body
        assert isinstance(error, dict) and error["param"] == "input" and error["details"]["index"] == 1
        with pytest.raises(ollama.ResponseError) as refused:
            await api.embed(model="emb", input="bee " * 100, truncate=False)
        assert refused.value.status_code == 400 and "context" in refused.value.error
        cut = await api.embed(model="emb", input="bee " * 100)  # Ollama truncates by default
        assert cut.prompt_eval_count == CTX

        chat = await client.chat.completions.create(
            model="emb", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content is not None
        assert fleet.spawned == [True, False]  # text went to a worker of its own
        async with queen.admin() as admin:
            listed = (await admin.get("/v2/workers/list")).json()["workers"]
        assert sorted(w["embedding"] for w in listed) == [False, True]
        after = await client.embeddings.create(model="emb", input="again", encoding_format="float")
        assert len(after.data[0].embedding) == 64 and fleet.spawned == [True, False]

        async with serve_queen() as static:  # registrations only: nothing can be started
            await static.register(fleet.workers[1], "emb")
            with pytest.raises(openai.BadRequestError) as only_text:
                await static.openai().embeddings.create(model="emb", input="x")
            assert "text generation only" in only_text.value.message
            with pytest.raises(ollama.ResponseError) as only_text_ollama:
                await ollama_client(static).embed(model="emb", input="x")
            assert only_text_ollama.value.status_code == 400
            await static.register(fleet.workers[0], "emb")
            served = await static.openai().embeddings.create(model="emb", input="x", encoding_format="float")
            assert len(served.data[0].embedding) == 64


async def test_bad_embedding_bodies_are_400s_in_each_api_shape(queen: Queen) -> None:
    async with queen.http() as http:
        bodies = [
            ({"input": "x"}, "model"),
            ({"model": "emb", "input": [1, 2]}, "input"),
            ({"model": "emb", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ]
        for body, param in bodies:
            response = await http.post("/v1/embeddings", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        unknown = await http.post("/v1/embeddings", json={"model": "nope", "input": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
        ollama_bad = await http.post("/api/embed", json={"model": "nope", "input": 5})
        assert ollama_bad.status_code == 400 and isinstance(ollama_bad.json()["error"], str)
        wrong_key = await httpx.AsyncClient(base_url=queen.url).post("/v1/embeddings", json=bodies[0][0])
        assert wrong_key.status_code == 401
