"""A worker started with `--embedding`: `/v1/embeddings` with the official `openai` client, and refusals.

One embedding worker (the tiny model, a 64-token context so an over-long input is
cheap to write) serves the whole module; every bad request is followed by a good
one, which shows the worker unharmed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from rbee_worker import cli
from rbee_worker.protocol.embeddings import decode_vector

from ..worker_proc import WorkerProcess
from .test_lifecycle import LONG

CTX = 64


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        tiny_model, log_dir=tmp_path_factory.mktemp("embedder"), ctx=CTX, slots=2, extra=["--embedding"]
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.kill()


def sdk(worker: WorkerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key=worker.api_key, max_retries=0, timeout=60)


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


def test_the_ready_report_names_the_capability(embedder: WorkerProcess) -> None:
    ready = embedder.wait_ready()
    assert ready["embedding"] is True and ready["dimensions"] == 64 and ready["pooling"] == "mean"


def test_the_openai_client_gets_unit_vectors_in_both_encodings(embedder: WorkerProcess) -> None:
    client = sdk(embedder)
    texts = ["the hive hums", "a queen bee", "the hive hums"]
    # the SDK asks for base64 unless told otherwise, and decodes it itself
    packed = client.embeddings.create(model="any", input=texts)
    plain = client.embeddings.create(model="any", input=texts, encoding_format="float")
    for answer in (packed, plain):
        assert [d.index for d in answer.data] == [0, 1, 2]
        assert all(len(d.embedding) == 64 and abs(norm(d.embedding) - 1) < 1e-4 for d in answer.data)
        assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    for a, b in zip(packed.data, plain.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    first, second, again = (d.embedding for d in plain.data)
    assert first == pytest.approx(again, abs=1e-5)  # batched together, still independent
    assert first != pytest.approx(second, abs=1e-3)
    alone = client.embeddings.create(model="any", input="a queen bee", encoding_format="float")
    assert alone.data[0].embedding == pytest.approx(second, abs=1e-4)


def test_raw_base64_is_little_endian_float32(embedder: WorkerProcess) -> None:
    with embedder.client() as http:
        floats = http.post("/v1/embeddings", json={"input": "bee"}).json()
        packed = http.post("/v1/embeddings", json={"input": ["bee"], "encoding_format": "base64"}).json()
    assert isinstance(packed["data"][0]["embedding"], str)
    assert decode_vector(packed["data"][0]["embedding"]) == pytest.approx(floats["data"][0]["embedding"])
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"


def test_an_input_over_the_context_is_a_400_naming_it_and_the_worker_is_unharmed(
    embedder: WorkerProcess,
) -> None:
    client = sdk(embedder)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="any", input=["short", "bee " * 100])
    error = caught.value.body
    assert isinstance(error, dict) and error["details"]["field"] == "input"
    assert error["details"]["index"] == 1 and error["details"]["context"] == CTX
    with embedder.client() as http:
        cut = http.post("/v1/embeddings", json={"input": "bee " * 100, "truncate": True})
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == CTX
    assert len(client.embeddings.create(model="any", input="still fine").data) == 1


BAD = [
    ({"input": [1, 2, 3]}, "input", "token arrays"),
    ({"input": [[1, 2]]}, "input", "token arrays"),
    ({"input": []}, "input", "non-empty list"),
    ({"input": ""}, "input", "non-empty"),
    ({"input": ["ok", 7.5]}, "input", "item 1"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float or base64"),
    ({"input": "x", "dimensions": 8}, "dimensions", "64 dimensions"),
    ({"input": "x", "truncate": "yes"}, "truncate", "true or false"),
    ({"input": "x", "wings": 4}, "wings", "unknown field"),
    ({"prompt": "x"}, "prompt", "unknown field"),
]


def test_bad_requests_are_400s_naming_the_field(embedder: WorkerProcess) -> None:
    with embedder.client() as http:
        for body, field, words in BAD:
            response = http.post("/v1/embeddings", json=body)
            error = response.json()["error"]
            assert response.status_code == 400, (body, response.text)
            assert error["details"]["field"] == field and words in error["message"], (body, error)
        assert http.post("/v1/embeddings", content=b"{nope").status_code == 400
        assert http.post("/v1/embeddings", json={"input": "fine"}).status_code == 200


def test_generation_on_an_embedding_worker_is_a_clear_400(embedder: WorkerProcess) -> None:
    with embedder.client() as http:
        response = http.post("/v1/inference", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 400
    assert "embeddings" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[WorkerProcess]:
    """A generation worker with one slot, one queue place and a short keep-alive interval."""
    worker = WorkerProcess(
        tiny_model,
        log_dir=tmp_path_factory.mktemp("generator"),
        slots=1,
        queue=1,
        ctx=16384,
        extra=["--sse-keepalive", "0.05"],
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.kill()


def test_embeddings_from_a_generation_worker_are_a_clear_400(generator: WorkerProcess) -> None:
    with generator.client() as http:
        response = http.post("/v1/embeddings", json={"input": "hi"})
        assert response.status_code == 400
        error = response.json()["error"]
        assert "--embedding" in error["message"] and error["details"]["field"] == "model"
        assert http.get("/v1/ready").json()["embedding"] is False


async def test_a_request_queued_for_a_slot_gets_sse_comments(generator: WorkerProcess) -> None:
    async with generator.async_client() as client:
        async with client.stream("POST", "/v1/inference", json=LONG) as running:
            chunks = aiter(running.aiter_bytes())
            seen = b""
            while b"event: token" not in seen:
                seen += await anext(chunks)
            queued_body = {"prompt": "q", "max_tokens": 3}
            async with client.stream("POST", "/v1/inference", json=queued_body) as queued:
                body = aiter(queued.aiter_bytes())
                head = b""
                while b": ping\n\n" not in head:  # the slot stays busy until we cancel the long one
                    head += await anext(body)
                assert b"event:" not in head
                stopped = await client.delete(f"/v1/inference/{running.headers['x-request-id']}")
                assert stopped.status_code == 200
                rest = head + b"".join([chunk async for chunk in body])
        assert rest.index(b": ping") < rest.index(b"event: started") < rest.index(b"event: end")
        assert rest.endswith(b"data: [DONE]\n\n")
        after = await client.post("/v1/inference", json={"prompt": "s", "max_tokens": 2})
        assert after.status_code == 200 and b"event: end" in after.content


def test_the_keepalive_interval_must_be_positive(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--model", str(tiny_model), "--api-key", "k", "--sse-keepalive", "0"]
    assert cli.main(argv) == 2
    assert "--sse-keepalive" in capsys.readouterr().err
