"""The OpenAI surface through the official SDK: models, chat and completions, streaming or not."""

from __future__ import annotations

import httpx
import openai
import pytest

from rbee_worker.protocol.events import iter_events

from ..worker_proc import WorkerProcess
from .conftest import Queen

SAMPLING = {"temperature": 1.0, "seed": 7, "max_tokens": 24}


async def _direct_text(worker: WorkerProcess, prompt: str, **sampling: object) -> str:
    async with worker.async_client() as client:
        body = {"prompt": prompt, **sampling}
        async with client.stream("POST", "/v1/inference", json=body) as response:
            assert response.status_code == 200
            events = [e async for e in iter_events(response.aiter_bytes())]
    assert events[-1].name == "end"
    return "".join(e.data["t"] for e in events if e.name == "token")


@pytest.fixture
async def registered(queen: Queen, pair: dict[str, WorkerProcess]) -> Queen:
    await queen.register(pair["alpha"], "alpha", node="n1")
    await queen.register(pair["beta"], "beta", node="n2")
    return queen


async def test_models_lists_what_registered_workers_serve(registered: Queen) -> None:
    models = await registered.openai().models.list()
    owners = {m.id: m.owned_by for m in models.data}
    assert owners == {"alpha": "n1", "beta": "n2"}
    assert all(m.object == "model" and isinstance(m.created, int) for m in models.data)


async def test_completion_non_stream_and_stream_agree(registered: Queen) -> None:
    client = registered.openai()
    whole = await client.completions.create(model="alpha", prompt="the hive", **SAMPLING)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    choice = whole.choices[0]
    assert choice.finish_reason in ("length", "stop") and choice.text
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = await client.completions.create(
        model="alpha", prompt="the hive", stream=True, stream_options={"include_usage": True}, **SAMPLING
    )
    texts, reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts.append(c.text)
            reasons.append(c.finish_reason)
    assert "".join(texts) == choice.text
    assert reasons[-1] == choice.finish_reason and all(r is None for r in reasons[:-1])
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


async def test_chat_non_stream_and_stream_with_the_fallback_template(registered: Queen) -> None:
    client = registered.openai()
    messages = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi bee"}]
    whole = await client.chat.completions.create(model="beta", messages=messages, **SAMPLING)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.model == "beta"
    message = whole.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert whole.choices[0].finish_reason in ("length", "stop")

    stream = await client.chat.completions.create(model="beta", messages=messages, stream=True, **SAMPLING)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


async def test_two_models_are_routed_to_their_own_workers(
    registered: Queen, pair: dict[str, WorkerProcess]
) -> None:
    """Same prompt and seed: each answer is exactly what its own worker says directly."""
    client = registered.openai()
    prompt = "rbee"
    expected = {name: await _direct_text(pair[name], prompt, **SAMPLING) for name in ("alpha", "beta")}
    assert expected["alpha"] != expected["beta"]
    for name in ("alpha", "beta", "alpha"):
        result = await client.completions.create(model=name, prompt=prompt, **SAMPLING)
        assert result.choices[0].text == expected[name]
        assert result.model == name


async def test_native_inference_relays_the_worker_stream_byte_for_byte(
    registered: Queen, pair: dict[str, WorkerProcess]
) -> None:
    body = {"prompt": "a bee", "max_tokens": 12, "seed": 3, "temperature": 1.0}
    async with registered.http() as client:
        response = await client.post("/v1/inference", json={**body, "model": "alpha"})
    # the queen names its requests; the direct request reuses that name so the bytes can match
    same_id = response.headers["x-request-id"]
    async with pair["alpha"].async_client() as direct:
        reference = (await direct.post("/v1/inference", json=body, headers={"X-Request-ID": same_id})).content
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    ours, theirs = response.content.split(b"\n\n"), reference.split(b"\n\n")

    # every block but `end` (whose timings differ run to run) and `started` (the worker mints each
    # request's id) is identical, bytes included
    def same(blocks: list[bytes]) -> list[bytes]:
        return [b for b in blocks if b"event: end" not in b and b"event: started" not in b]

    assert same(ours) == same(theirs)
    assert ours[0].startswith(b"event: started") and theirs[0].startswith(b"event: started")
    assert ours[-2:] == [b"data: [DONE]", b""]


async def test_unknown_model_is_404_listing_the_available_ones(registered: Queen) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await registered.openai().completions.create(model="gamma", prompt="x", max_tokens=2)
    error = caught.value.body
    assert error["code"] == "MODEL_NOT_FOUND" and error["type"] == "not_found_error"
    assert sorted(error["details"]["available"]) == ["alpha", "beta"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"stop": 3}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
async def test_invalid_parameters_are_400_naming_the_parameter(
    registered: Queen, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await registered.openai().chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "x"}], **extra
        )
    assert caught.value.body["code"] == "INVALID_REQUEST"
    assert caught.value.body["param"] == param


async def test_wrong_or_missing_key_is_401_and_health_is_public(registered: Queen) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await registered.openai(api_key="wrong").models.list()
    assert caught.value.body["code"] == "INVALID_API_KEY"
    async with httpx.AsyncClient(base_url=registered.url) as anonymous:
        missing = await anonymous.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "INVALID_API_KEY"
        assert (await anonymous.get("/health")).status_code == 200

    async def drop_authorization(request: httpx.Request) -> None:
        del request.headers["Authorization"]

    bare = httpx.AsyncClient(event_hooks={"request": [drop_authorization]})
    async with bare:
        no_key = registered.openai(api_key="unused", http_client=bare)
        with pytest.raises(openai.AuthenticationError) as caught:
            await no_key.models.list()
    assert caught.value.status_code == 401


async def test_worker_list_never_shows_keys(registered: Queen, pair: dict[str, WorkerProcess]) -> None:
    async with registered.admin() as client:
        response = await client.get("/v2/workers/list")
    assert response.status_code == 200
    listed = response.json()["workers"]
    assert {w["model"] for w in listed} == {"alpha", "beta"}
    for worker in pair.values():
        assert worker.api_key not in response.text
    assert all("api_key" not in w for w in listed)


async def test_register_refuses_a_wrong_worker_key(queen: Queen, pair: dict[str, WorkerProcess]) -> None:
    async with queen.admin() as client:
        response = await client.post(
            "/v2/workers/register", json={"url": pair["alpha"].url, "api_key": "nope", "model": "alpha"}
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "api_key"
        listed = (await client.get("/v2/workers/list")).json()["workers"]
    assert listed == []


async def test_register_takes_the_seeds_body(queen: Queen, pair: dict[str, WorkerProcess]) -> None:
    seeds = {
        "worker_id": "w-seed", "url": pair["alpha"].url + "/", "api_key": pair["alpha"].api_key,
        "model_ref": "alpha", "node_name": "gpu-box", "backend": "cpu", "device": 0, "vram_bytes": 0,
    }  # fmt: skip
    async with queen.admin() as client:
        response = await client.post("/v2/workers/register", json=seeds)
        assert response.status_code == 201, response.text
        (listed,) = (await client.get("/v2/workers/list")).json()["workers"]
        bad = await client.post("/v2/workers/register", json={**seeds, "slots_total": 0})
    assert listed["id"] == "w-seed" and listed["node"] == "gpu-box" and listed["model"] == "alpha"
    assert listed["url"] == pair["alpha"].url and (listed["backend"], listed["device"]) == ("cpu", 0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "slots"


async def test_native_stream_can_be_cancelled_through_the_queen(registered: Queen) -> None:
    body = {"model": "alpha", "prompt": "a", "max_tokens": 4000}
    async with registered.http() as client:
        async with client.stream(
            "POST", "/v1/inference", json=body, headers={"X-Request-ID": "cancel-me"}
        ) as response:
            request_id = response.headers["x-request-id"]  # the queen's own; ours is only correlation
            assert response.headers["x-correlation-id"] == "cancel-me"
            names = []
            async for event in iter_events(response.aiter_bytes()):
                names.append(event.name)
                if event.name == "token" and names.count("token") == 1:
                    cancelled = await client.delete(f"/v1/inference/{request_id}")
                    assert cancelled.json() == {"request_id": request_id, "cancelled": True}
                last = event
        assert last.name == "end" and last.data["stop_reason"] == "cancelled"
        assert last.data["tokens_out"] < 4000
        assert (await client.delete(f"/v1/inference/{request_id}")).status_code == 404
