"""`upstreams:`: a real llama_cpp.server behind the queen, reached with the official openai client.

The engine runs the tiny model on loopback with an API key that only the secrets
file holds; a second upstream points at a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from rbee_control.inventory.loader import load_inventory
from rbee_control.inventory.secrets import SecretStore
from rbee_control.inventory.upstreams import Upstream
from rbee_control.queen.cli import load_upstreams
from rbee_control.queen.metrics import QueenMetrics
from rbee_control.queen.upstreams import Upstreams, UpstreamState
from rbee_worker.app.server import bind_socket
from rbee_worker.protocol.errors import RbeeError

from ..worker_proc import free_port
from .conftest import Queen, metric, serve_queen

ENGINE_KEY = "engine-secret-key"
START_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` on the tiny model as `tiny-up`; its base URL (…/v1)."""
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "server.log"
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model), "--model_alias", "tiny-up",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "1",
        "--api_key", ENGINE_KEY, "--verbose", "False",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"llama_cpp.server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"llama_cpp.server did not start:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {ENGINE_KEY}"}).is_success:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def inventory(engine: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upstreams") / "inventory.yaml"
    down = free_port()  # nobody listens: an engine that is down
    path.write_text(
        "nodes: {}\n"
        "upstreams:\n"
        f"  engine: {{url: '{engine}'}}\n"
        f"  gone: {{url: 'http://127.0.0.1:{down}/v1', models: [ghost]}}\n"
    )
    SecretStore.beside(path).set_upstream_key("engine", ENGINE_KEY)
    return path


@pytest.fixture
async def queen(inventory: Path) -> AsyncIterator[Queen]:
    upstreams, keys = load_upstreams(inventory)
    async with serve_queen(upstreams=upstreams, upstream_keys=keys) as running:
        assert running.state.upstreams is not None
        await running.state.upstreams.check_all()
        yield running


async def test_models_of_the_engine_are_offered_next_to_rbees(queen: Queen) -> None:
    listing = {m.id: m.owned_by for m in (await queen.openai().models.list()).data}
    assert listing == {"tiny-up": "engine", "ghost": "gone"}
    for name in ("tiny-up", "engine/tiny-up", "ghost"):
        model = await queen.openai().models.retrieve(name)
        assert (model.id, model.owned_by) == (name, "gone" if name == "ghost" else "engine")


async def test_chat_and_completions_through_the_queen(queen: Queen) -> None:
    client = queen.openai()
    messages = [{"role": "user", "content": "hello"}]
    chat = await client.chat.completions.create(model="tiny-up", messages=messages, max_tokens=8, seed=1)
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage is not None and chat.usage.completion_tokens > 0  # the engine's own count
    assert chat.choices[0].finish_reason in ("length", "stop")

    stream = await client.chat.completions.create(
        model="engine/tiny-up", messages=messages, max_tokens=8, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.object == "chat.completion.chunk" for c in chunks)

    text = await client.completions.create(model="tiny-up", prompt="once", max_tokens=4)
    assert text.choices[0].text is not None
    stream_text = await client.completions.create(model="tiny-up", prompt="once", max_tokens=4, stream=True)
    assert [c async for c in stream_text]

    async with queen.http() as http:
        scraped = (await http.get("/metrics")).text
    assert (
        metric(scraped, 'rbee_queen_requests_total{model="tiny-up",node="engine",outcome="ok",route="chat"}')
        == 1
    )
    assert metric(scraped, 'rbee_queen_upstream_up{upstream="engine"}') == 1
    assert metric(scraped, 'rbee_queen_upstream_up{upstream="gone"}') == 0


async def test_a_down_engine_answers_a_clear_error(queen: Queen) -> None:
    client = queen.openai()
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="ghost", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert caught.value.status_code == 502
    message = caught.value.message
    assert "upstream gone" in message and "is down" in message and "cannot connect" in message

    async with queen.admin() as admin:
        listed = {u["name"]: u for u in (await admin.get("/v2/upstreams")).json()["upstreams"]}
    assert listed["gone"]["up"] is False and "cannot connect" in listed["gone"]["error"]
    assert listed["gone"]["models"] == ["ghost"] and listed["gone"]["models_from"] == "inventory"
    assert listed["engine"]["up"] is True and listed["engine"]["models"] == ["tiny-up"]
    assert ENGINE_KEY not in str(listed)
    async with queen.http() as client_plane:  # the client key does not reach the admin plane
        assert (await client_plane.get("/v2/upstreams")).status_code in (401, 403)


async def test_the_engines_own_errors_come_back_as_they_are(queen: Queen) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await queen.openai().chat.completions.create(
            model="tiny-up", messages=[{"role": "nobody", "content": "hi"}], max_tokens=2
        )
    # llama_cpp.server answers a validation error with 500 and pydantic's text: passed on unchanged
    assert caught.value.status_code == 500 and "Input should be 'user'" in caught.value.message


async def test_without_its_key_the_engine_is_down_and_says_why(inventory: Path) -> None:
    upstreams, _keys = load_upstreams(inventory)
    async with serve_queen(upstreams=upstreams, upstream_keys={}) as queen:
        assert queen.state.upstreams is not None
        await queen.state.upstreams.check_all()
        state = queen.state.upstreams.states["engine"]
        assert state.up is False and state.error is not None and "401" in state.error


@pytest.mark.parametrize(
    ("block", "where"),
    [
        ("up: {url: 'ftp://h/v1'}", "upstreams.up.url: expected an http:// or https:// URL"),
        ("up: {url: 'http://me:pw@h:8000/v1'}", "credentials do not belong in the inventory"),
        ("up: {url: 'http:///v1'}", "upstreams.up.url: expected a host name"),
        ("up: {url: 'http://h:99999/v1'}", "upstreams.up.url: not a valid URL"),
        ("up: {url: 'http://h/v1?x=1'}", "without ?query"),
        ("up: {models: [a]}", "missing required key 'url'"),
        ("up: {url: 'http://h/v1', models: []}", "upstreams.up.models: expected a non-empty list"),
        ("up: {url: 'http://h/v1', models: [a, a]}", "upstreams.up.models[1]: model 'a' listed twice"),
        ("up: {url: 'http://h/v1', models: ['a b']}", "upstreams.up.models[0]: invalid model name"),
        ("up: {url: 'http://h/v1', key: sk-1}", "upstreams.up.key: unknown key"),
        ("n1: {url: 'http://h/v1'}", "'n1' is also a node's name"),
        ("'bad name': {url: 'http://h/v1'}", "invalid upstream name"),
    ],
)
def test_a_bad_upstream_in_the_inventory_is_located(tmp_path: Path, block: str, where: str) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(f"nodes:\n  n1: {{transport: local}}\nupstreams:\n  {block}\n")
    with pytest.raises(RbeeError) as caught:
        load_inventory(path)
    assert caught.value.code == "INVENTORY_INVALID"
    assert where in caught.value.message and "inventory.yaml:" in caught.value.message


def test_a_good_upstream_loads_with_its_trailing_slash_dropped(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("upstreams:\n  vllm: {url: 'https://10.0.0.5:8000/v1/', models: [Qwen/Qwen2.5-7B]}\n")
    upstream = load_inventory(path).upstreams["vllm"]
    assert upstream.url == "https://10.0.0.5:8000/v1" and upstream.models == ("Qwen/Qwen2.5-7B",)
    assert upstream.endpoint("chat/completions") == "https://10.0.0.5:8000/v1/chat/completions"


def _broken_engine() -> Starlette:
    """An engine whose stream breaks off after one chunk (the process died, the link dropped)."""

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "brittle", "object": "model"}]})

    async def chat(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            delta = {"index": 0, "delta": {"content": "half"}, "finish_reason": None}
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "brittle",
                     "choices": [delta]}  # fmt: skip
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            raise RuntimeError("the engine died")

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    )


async def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error(tmp_path: Path) -> None:
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(_broken_engine(), log_level="critical", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done()
            await asyncio.sleep(0.01)
        path = tmp_path / "inventory.yaml"
        path.write_text(f"upstreams:\n  brittle: {{url: 'http://127.0.0.1:{sock.getsockname()[1]}/v1'}}\n")
        upstreams, keys = load_upstreams(path)
        async with serve_queen(upstreams=upstreams, upstream_keys=keys) as queen:
            assert queen.state.upstreams is not None
            await queen.state.upstreams.check_all()
            stream = await queen.openai().chat.completions.create(
                model="brittle", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            seen: list[str] = []
            with pytest.raises(openai.APIError) as caught:
                async for chunk in stream:
                    seen.append(chunk.choices[0].delta.content or "")
            assert seen == ["half"]
            assert "upstream brittle" in caught.value.message and "broke off" in caught.value.message
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def _state(name: str, models: tuple[str, ...]) -> UpstreamState:
    return UpstreamState(Upstream(name, f"http://{name}:8000/v1", models))


def test_rbee_wins_a_name_both_offer_and_the_upstream_keeps_its_pinned_name() -> None:
    upstreams = Upstreams([], {}, QueenMetrics())
    upstreams.states = {"vllm": _state("vllm", ("qwen", "llama")), "ollama": _state("ollama", ("llama",))}
    local = {"qwen"}
    assert upstreams.find("qwen", local) is None  # rbee's own worker
    pinned = upstreams.find("vllm/qwen", local)
    assert pinned is not None and (pinned.state.name, pinned.model) == ("vllm", "qwen")
    first = upstreams.find("llama", local)
    assert first is not None and first.state.name == "vllm"  # the inventory's order
    assert upstreams.find("ollama/qwen", local) is None and upstreams.find("nope", local) is None
    assert upstreams.public_models(local) == [
        ("vllm/qwen", "vllm"),
        ("llama", "vllm"),
        ("ollama/llama", "ollama"),
    ]
