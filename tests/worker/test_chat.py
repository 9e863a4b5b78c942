"""Chat messages on a real worker: its GGUF template, the fallback, and templates that try to hang it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rbee_worker.tinymodel import write_tiny_model

from ..worker_proc import WorkerProcess
from .sse import collect

#: Writes BOS itself, as Llama-style templates do; the tiny model's runtime adds BOS too.
TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
RENDERED_AFTER_BOS = "[user] hi bee\n[assistant]"
HI = [{"role": "user", "content": "hi bee"}]
NESTED_LOOPS = (
    "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}"
    "{% endfor %}{% endfor %}{% endfor %}"
)
ONE = {"max_tokens": 1, "temperature": 0}


@pytest.fixture(scope="module")
def chat_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    directory = tmp_path_factory.mktemp("chat")
    model = write_tiny_model(directory / "chat.gguf", chat_template=TEMPLATE)
    worker = WorkerProcess(model, log_dir=directory, ctx=2048)
    worker.wait_ready()
    yield worker
    worker.kill()


async def _prompt_tokens(worker: WorkerProcess, body: dict[str, object]) -> int:
    async with worker.async_client() as client:
        events = await collect(client, {**body, **ONE})
    end = next(e for e in events if e.name == "end")
    return int(end.data["prompt_tokens"])


async def test_ready_says_whether_the_model_has_a_chat_template(
    shared_tiny_worker: WorkerProcess, chat_worker: WorkerProcess
) -> None:
    plain = shared_tiny_worker.wait_ready()
    assert plain["chat"] is False and plain["chat_template"] == "fallback"
    templated = chat_worker.wait_ready()
    assert templated["chat"] is True and templated["chat_template"] == "gguf"


async def _one_bos(worker: WorkerProcess) -> None:
    chat = await _prompt_tokens(worker, {"messages": HI})
    assert chat == await _prompt_tokens(worker, {"prompt": RENDERED_AFTER_BOS})
    # the template's BOS text kept as well would have cost a token (or three) of its own
    assert chat < await _prompt_tokens(worker, {"prompt": "<s>" + RENDERED_AFTER_BOS})


async def test_messages_render_with_the_gguf_template_and_one_bos(chat_worker: WorkerProcess) -> None:
    await _one_bos(chat_worker)


@pytest.mark.llama
async def test_one_bos_on_llama_cpp_too(worker_factory: type[WorkerProcess], tmp_path: Path) -> None:
    """llama.cpp reads `<s>` in text as the BOS token itself: kept, it would be a second BOS."""
    worker = worker_factory(
        write_tiny_model(tmp_path / "chat.gguf", chat_template=TEMPLATE), backend="llama-cpp"
    )
    assert worker.wait_ready()["runtime"] == "llama-cpp"
    await _one_bos(worker)


async def test_messages_without_a_template_get_the_transcript_fallback(
    shared_tiny_worker: WorkerProcess,
) -> None:
    messages = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi bee"}]
    chat = await _prompt_tokens(shared_tiny_worker, {"messages": messages})
    transcript = "System: be terse\nUser: hi bee\nAssistant:"
    assert chat == await _prompt_tokens(shared_tiny_worker, {"prompt": transcript})


async def test_a_request_template_replaces_the_model_one(chat_worker: WorkerProcess) -> None:
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    chat = await _prompt_tokens(chat_worker, {"messages": HI, "chat_template": chatml})
    assert chat == await _prompt_tokens(chat_worker, {"prompt": "<|im_start|>user\nhi bee<|im_end|>\n"})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "messages": HI}, "messages"),
        ({"max_tokens": 1}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": HI, "chat_template": ""}, "chat_template"),
        ({"prompt": "x", "chat_template": "{{ 1 }}"}, "chat_template"),
    ],
)
async def test_prompt_and_messages_exactly_one(
    shared_tiny_worker: WorkerProcess, body: dict[str, object], field: str
) -> None:
    async with shared_tiny_worker.async_client() as client:
        response = await client.post("/v1/inference", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST" and error["details"]["field"] == field


async def _bomb_while_health_answers(worker: WorkerProcess, body: dict[str, object]) -> httpx.Response:
    async with worker.async_client() as client, httpx.AsyncClient(base_url=worker.url) as plain:
        bomb = asyncio.create_task(client.post("/v1/inference", json={**body, **ONE}))
        healths = []
        for _ in range(3):  # while the template spins on the worker's thread
            healths.append((await plain.get("/health", timeout=30)).status_code)
        response = await bomb
        assert healths == [200, 200, 200]
        assert (await plain.get("/health", timeout=30)).status_code == 200
    assert "rbee_worker/chat" not in worker.log(), "the interrupted render left a traceback"
    return response


async def test_a_template_bomb_from_a_request_is_refused_and_the_worker_keeps_serving(
    shared_tiny_worker: WorkerProcess,
) -> None:
    response = await _bomb_while_health_answers(
        shared_tiny_worker, {"messages": HI, "chat_template": NESTED_LOOPS}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "CHAT_TEMPLATE_FAILED" and error["details"]["reason"] == "time"
    assert "within" in error["message"]
    async with shared_tiny_worker.async_client() as client:
        events = await collect(client, {"messages": HI, **ONE})
    assert events[-1].name == "end"


async def test_a_template_bomb_in_the_gguf_is_refused_and_prompts_still_work(
    worker_factory: type[WorkerProcess], tmp_path: Path
) -> None:
    model = write_tiny_model(tmp_path / "bomb.gguf", chat_template=NESTED_LOOPS)
    worker = worker_factory(model, ctx=2048)
    assert worker.wait_ready()["chat_template"] == "gguf"
    response = await _bomb_while_health_answers(worker, {"messages": HI})
    assert response.status_code == 422 and response.json()["error"]["code"] == "CHAT_TEMPLATE_FAILED"
    size_bomb = {"messages": HI, "chat_template": "{{ 'x' * 10**10 }}"}
    async with worker.async_client() as client:
        refused = await client.post("/v1/inference", json={**size_bomb, **ONE})
        assert refused.status_code == 422 and refused.json()["error"]["details"]["reason"] == "limit"
        events = await collect(client, {"prompt": "hi", **ONE})
    assert events[-1].name == "end"


@pytest.mark.slow
@pytest.mark.llama
async def test_smollm2_answers_messages_with_its_own_template(
    worker_factory: type[WorkerProcess], smollm2: Path
) -> None:
    worker = worker_factory(smollm2, backend="llama-cpp", ctx=2048)
    ready = worker.wait_ready(timeout=120)
    assert ready["chat"] is True and ready["chat_template"] == "gguf"
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    async with worker.async_client() as client:
        events = await collect(client, {"messages": question, "max_tokens": 40, "temperature": 0})
        answer = "".join(e.data["t"] for e in events if e.name == "token")
        end = events[-1].data
        assert "Paris" in answer and "<|im_" not in answer
        assert end["stop_reason"] in ("eos", "stop")  # the template's <|im_end|> ended the turn
        # SmolLM2's template writes its own system turn; the same text as a prompt costs the same tokens
        rendered = (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            "<|im_end|>\n<|im_start|>user\n" + question[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
        )
        direct = await collect(client, {"prompt": rendered, "max_tokens": 1})
    assert end["prompt_tokens"] == direct[-1].data["prompt_tokens"]
