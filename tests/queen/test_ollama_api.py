"""Ollama's API through the official `ollama` client, unmodified, against a real queen and workers."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import ollama
import pytest

from rbee_control.queen import ModelEntry
from rbee_worker.gguf_info import read_gguf_info

from ..worker_proc import WorkerProcess
from .conftest import QUEEN_KEY, Queen, metric, serve_queen
from .test_cold_start import ProcessFleet

OPTIONS = {"temperature": 1.0, "seed": 7, "num_predict": 16}
HI = [{"role": "user", "content": "hi bee"}]


def client(queen: Queen, key: str = QUEEN_KEY) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=queen.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture
async def registered(queen: Queen, pair: dict[str, WorkerProcess]) -> Queen:
    await queen.register(pair["alpha"], "alpha", node="n1")
    await queen.register(pair["beta"], "beta", node="n2")
    return queen


def _check_final(final: ollama.ChatResponse | ollama.GenerateResponse, cap: int) -> None:
    assert final.done is True and final.done_reason in ("stop", "length")
    assert final.eval_count is not None and 0 < final.eval_count <= cap
    assert final.prompt_eval_count is not None and final.prompt_eval_count > 0
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, name), int), name
    assert final.total_duration is not None and final.total_duration > 0


async def test_chat_stream_and_non_stream_agree(registered: Queen) -> None:
    api = client(registered)
    whole = await api.chat(model="beta", messages=HI, options=OPTIONS, stream=False)
    assert whole.model == "beta" and whole.message.role == "assistant" and whole.message.content
    _check_final(whole, 16)

    parts = [part async for part in await api.chat(model="beta", messages=HI, options=OPTIONS, stream=True)]
    assert all(p.done is False for p in parts[:-1]) and parts[-1].done is True
    assert parts[-1].message.content == "" and parts[-1].done_reason == whole.done_reason
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[0].created_at


async def test_generate_stream_and_non_stream_agree_raw_or_templated(registered: Queen) -> None:
    api = client(registered)
    for raw in (False, True):
        whole = await api.generate(model="alpha", prompt="the hive", raw=raw, options=OPTIONS)
        assert whole.response and whole.model == "alpha"
        _check_final(whole, 16)
        stream = await api.generate(model="alpha", prompt="the hive", raw=raw, options=OPTIONS, stream=True)
        parts = [part async for part in stream]
        assert "".join(p.response for p in parts) == whole.response
        assert parts[-1].done and parts[-1].done_reason == whole.done_reason


async def test_options_are_honoured_as_the_openai_route_honours_them(registered: Queen) -> None:
    api = client(registered)
    sampling = {"temperature": 1.0, "seed": 21, "top_k": 20, "top_p": 0.9}
    mine = await api.generate(model="alpha", prompt="buzz", raw=True, options={**sampling, "num_predict": 12})
    theirs = await registered.openai().completions.create(
        model="alpha", prompt="buzz", max_tokens=12, **{k: v for k, v in sampling.items() if k != "top_k"},
        extra_body={"top_k": 20},
    )  # fmt: skip
    assert mine.response == theirs.choices[0].text
    other = await api.generate(
        model="alpha", prompt="buzz", raw=True, options={**sampling, "seed": 22, "num_predict": 12}
    )
    assert other.response != mine.response

    capped = await api.generate(
        model="alpha", prompt="buzz", raw=True, options={**sampling, "num_predict": 3}
    )
    assert capped.eval_count is not None and capped.eval_count <= 3
    assert (capped.done_reason == "length") == (capped.eval_count == 3)

    greedy = {"temperature": 0, "seed": 5, "num_predict": 10}
    first = await api.chat(model="beta", messages=HI, options=greedy)
    second = await api.chat(model="beta", messages=HI, options=greedy)
    assert first.message.content == second.message.content and first.eval_count == second.eval_count


async def test_a_stop_option_ends_the_answer_before_it(registered: Queen) -> None:
    api = client(registered)
    options = {"temperature": 0, "num_predict": 24}
    whole = (await api.generate(model="alpha", prompt="the hive", raw=True, options=options)).response
    assert len(whole) > 6
    stop = whole[3:6]
    cut = await api.generate(model="alpha", prompt="the hive", raw=True, options={**options, "stop": [stop]})
    assert cut.response == whole[: whole.index(stop)] and cut.done_reason == "stop"


async def test_tags_ps_show_and_version(registered: Queen) -> None:
    api = client(registered)
    listed = await api.list()
    assert sorted(m.model for m in listed.models) == ["alpha", "beta"]
    for model in listed.models:
        assert model.modified_at is not None and model.details is not None and model.details.format == "gguf"

    running = await api.ps()
    assert sorted((m.name, m.model) for m in running.models) == [("alpha", "alpha"), ("beta", "beta")]

    shown = await api.show("alpha")
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.capabilities == ["completion"] and shown.modified_at is not None
    assert "temperature" in (shown.parameters or "")
    assert (await api.show("alpha:latest")).details == shown.details  # Ollama's default tag

    async with registered.http() as http:
        version = (await http.get("/api/version")).json()
    assert version["version"].count(".") == 2 and "rbee" in version


async def test_unknown_model_is_404_and_a_wrong_key_401(registered: Queen) -> None:
    api = client(registered)
    for call in (
        api.chat(model="nope", messages=HI),
        api.generate(model="nope", prompt="x"),
        api.show("nope"),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            await call
        assert caught.value.status_code == 404 and "nope" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        [_ async for _ in await api.chat(model="nope", messages=HI, stream=True)]
    assert caught.value.status_code == 404

    with pytest.raises(ollama.ResponseError) as caught:
        await client(registered, key="wrong").list()
    assert caught.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as caught:
        await client(registered, key="wrong").chat(model="alpha", messages=HI)
    assert caught.value.status_code == 401


async def test_bad_input_is_a_clear_error_and_the_worker_is_unharmed(registered: Queen) -> None:
    api = client(registered)
    refusals = [
        (api.chat(model="alpha", messages=HI, format={"type": "strnig"}), 400, "format"),
        (api.chat(model="alpha", messages=HI, format={"$ref": "#/nowhere"}), 400, "schema"),
        (api.chat(model="alpha", messages=HI, options={"num_predict": 0}), 400, "options.num_predict"),
        (api.chat(model="alpha", messages=HI, options={"temperature": 9}), 400, "options.temperature"),
        (
            api.chat(model="alpha", messages=HI, options={"repeat_penalty": 11}),
            400,
            "options.repeat_penalty",
        ),
        (api.chat(model="alpha", messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
        (api.generate(model="alpha", prompt="x", suffix="y"), 400, "suffix"),
        (api.embed(model="alpha", input="x"), 400, "text generation only"),
        (api.embed(model="nope", input="x"), 404, "nope"),
        (api.pull("alpha"), 501, "rbee-keeper"),
    ]
    for call, status, words in refusals:
        with pytest.raises(ollama.ResponseError) as caught:
            await call
        assert caught.value.status_code == status and words in caught.value.error, caught.value.error
    async with registered.http() as http:
        response = await http.post(
            "/api/chat", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    answer = await api.chat(model="alpha", messages=HI, options={"num_predict": 4})
    assert answer.done and answer.eval_count


async def test_an_empty_message_list_loads_the_model(registered: Queen) -> None:
    loaded = await client(registered).chat(model="alpha", messages=[])
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""
    unloaded = await client(registered).generate(model="alpha", keep_alive=0)
    assert unloaded.done_reason == "unload" and unloaded.response == ""
    assert len((await client(registered).ps()).models) == 2  # the workers are the queen's to stop


class DescribedFleet(ProcessFleet):
    """Lists the model with what a hive's catalog knows about its file."""

    async def list_models(self) -> list[ModelEntry]:
        info = read_gguf_info(self.model)
        return [
            ModelEntry(
                "cold", "local", context_length=2048, digest="ab" * 32, size=info.size,
                architecture=info.architecture, quantization=info.quantization, modified_at=1_700_000_000.0,
            )
        ]  # fmt: skip


async def test_a_cold_start_through_api_chat(worker_factory: type[WorkerProcess], tiny_model: Path) -> None:
    fleet = DescribedFleet(tiny_model, worker_factory)
    info = read_gguf_info(tiny_model)
    async with serve_queen(fleet) as queen:
        api = client(queen)
        tag = (await api.list()).models
        assert [(m.model, m.size, m.digest) for m in tag] == [("cold", info.size, "ab" * 32)]
        assert tag[0].details is not None and tag[0].details.family == info.architecture
        assert (await api.ps()).models == []

        async def ask(seed: int) -> ollama.ChatResponse:
            parts = [
                p async for p in await api.chat(
                    model="cold", messages=HI, options={"seed": seed, "num_predict": 8}, stream=True
                )
            ]  # fmt: skip
            return parts[-1]

        async with asyncio.timeout(60):
            finals = await asyncio.gather(*(ask(seed) for seed in range(3)))
        assert all(f.done and f.done_reason in ("stop", "length") for f in finals)
        assert fleet.spawns == 1
        assert max(f.load_duration or 0 for f in finals) > 0  # someone waited for the worker to start

        shown = await api.show("cold")
        assert shown.details is not None and shown.details.family == info.architecture
        assert shown.details.quantization_level == info.quantization
        assert shown.modelinfo == {
            "general.architecture": info.architecture, f"{info.architecture}.context_length": 2048,
        }  # fmt: skip
        running = (await api.ps()).models
        assert [(m.model, m.size) for m in running] == [("cold", info.size)]
        counted = 'rbee_queen_requests_total{model="cold",node="local",outcome="ok",route="ollama_chat"}'
        async with asyncio.timeout(10):  # a stream's record is committed just after its last line
            while metric(queen.state.metrics.render().decode(), counted) < 3:
                await asyncio.sleep(0.05)


async def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error_line(
    worker_factory: type[WorkerProcess], model_files: dict[str, Path]
) -> None:
    worker = worker_factory(model_files["alpha"], ctx=16384)
    worker.wait_ready()
    async with serve_queen() as queen:
        await queen.register(worker, "alpha", node="n1")
        stream = await client(queen).generate(
            model="alpha", prompt="a", raw=True, options={"num_predict": 15_000}, stream=True
        )
        received = 0
        with pytest.raises(ollama.ResponseError) as caught:
            async with asyncio.timeout(30):
                async for _part in stream:
                    received += 1
                    if received == 3:
                        worker.proc.send_signal(signal.SIGKILL)
                        worker.proc.wait(10)
        assert received >= 3 and "failed after the first token" in caught.value.error


async def test_ndjson_and_the_routes_over_plain_http(registered: Queen) -> None:
    async with registered.http() as http:
        body = {"model": "alpha", "prompt": "x", "raw": True, "options": {"num_predict": 4}}
        async with http.stream("POST", "/api/generate", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            lines = [line async for line in response.aiter_lines() if line]
        assert len(lines) >= 2 and '"done":true' in lines[-1]


async def test_an_empty_prompt_cold_starts_the_model_as_ollama_loads_it(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    fleet = ProcessFleet(tiny_model, worker_factory)
    async with serve_queen(fleet) as queen:
        api = client(queen)
        loaded = await api.generate(model="cold:latest")
        assert loaded.done_reason == "load" and fleet.spawns == 1
        assert [m.model for m in (await api.ps()).models] == ["cold"]


BAD_BODIES = {
    "oversized 5 MiB": b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}',
    "invalid JSON": b'{"prompt": ',
    "not UTF-8": b'{"prompt": "\xff\xfe"}',
    "empty": b"",
    "a JSON list": b"[1, 2, 3]",
    "JSON null": b"null",
    "huge number": b'{"model": "alpha", "prompt": "x", "options": {"num_predict": 1e400}}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
}


async def test_bad_bodies_on_every_ollama_route_are_4xx_in_ollama_shape(registered: Queen) -> None:
    problems = []
    async with registered.http() as http:
        for path in ("/api/chat", "/api/generate", "/api/show", "/api/embed"):
            for name, body in BAD_BODIES.items():
                if name == "huge number" and path in ("/api/show", "/api/embed"):
                    continue  # they take no options
                response = await http.post(path, content=body, headers={"content-type": "application/json"})
                error = response.json().get("error") if response.status_code != 200 else None
                if not (400 <= response.status_code < 500 and isinstance(error, str) and error):
                    problems.append(f"{path} {name}: {response.status_code} {response.text[:120]}")
        for method, path in [("GET", "/api/tags"), ("GET", "/api/ps"), ("GET", "/api/version")]:
            wrong = await http.request(method, path, headers={"Authorization": "Bearer wrong"})
            if wrong.status_code != 401:
                problems.append(f"{method} {path} with a wrong key: {wrong.status_code}")
    assert not problems, "\n".join(problems)
    answer = await client(registered).generate(model="alpha", prompt="x", options={"num_predict": 2})
    assert answer.done and answer.eval_count


async def test_a_client_hanging_up_mid_stream_stops_the_generation_on_the_worker(
    worker_factory: type[WorkerProcess], model_files: dict[str, Path]
) -> None:
    long = 15_000
    worker = worker_factory(model_files["alpha"], ctx=16384)
    worker.wait_ready()
    async with serve_queen() as queen:
        await queen.register(worker, "alpha")
        async with queen.http() as http, asyncio.timeout(30):
            body = {"model": "alpha", "prompt": "a", "raw": True, "options": {"num_predict": long}}
            async with http.stream("POST", "/api/generate", json=body) as response:
                assert response.status_code == 200
                async for _line in response.aiter_lines():
                    break  # one object, then hang up
            stopped = ""
            async with httpx.AsyncClient(base_url=worker.url, headers=worker.headers) as direct:
                while (
                    metric(stopped, 'rbee_worker_requests_total{outcome="disconnected"}')
                    + metric(stopped, 'rbee_worker_requests_total{outcome="cancelled"}')
                    < 1
                ):
                    await asyncio.sleep(0.05)
                    stopped = (await direct.get("/metrics")).text
        assert metric(stopped, "rbee_worker_tokens_total") < long / 4
