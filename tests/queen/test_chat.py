"""Chat through the queen: messages go to the worker, which renders them with the template it is given."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ..worker.sse import collect
from ..worker_proc import WorkerProcess
from .conftest import Queen, start_worker

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
RENDERED = "<|im_start|>user\nhi bee<|im_end|>\n<|im_start|>assistant\n"
BOMB = "{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}"
HI = [{"role": "user", "content": "hi bee"}]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[WorkerProcess]:
    started = start_worker(tiny_model, tmp_path_factory.mktemp("chat"), ctx=4096)
    yield started
    started.kill()


async def _direct_prompt_tokens(worker: WorkerProcess, prompt: str) -> int:
    async with worker.async_client() as client:
        events = await collect(client, {"prompt": prompt, "max_tokens": 1})
    return int(events[-1].data["prompt_tokens"])


async def test_a_registered_template_is_rendered_by_the_worker(queen: Queen, worker: WorkerProcess) -> None:
    await queen.register(worker, "tiny-chat", chat_template=CHATML)
    reply = await queen.openai().chat.completions.create(
        model="tiny-chat", messages=HI, max_tokens=2, temperature=0
    )
    assert reply.usage is not None
    expected = await _direct_prompt_tokens(worker, RENDERED)
    assert reply.usage.prompt_tokens == expected
    # the native route passes messages through, with the registered template as well
    async with queen.http() as client:
        events = await collect(client, {"model": "tiny-chat", "messages": HI, "max_tokens": 1})
    assert events[-1].data["prompt_tokens"] == expected


async def test_a_registered_template_bomb_is_422_and_everything_keeps_answering(
    queen: Queen, worker: WorkerProcess
) -> None:
    await queen.register(worker, "bomb", chat_template=BOMB)
    client = queen.openai()
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await client.chat.completions.create(model="bomb", messages=HI, max_tokens=2)
    assert caught.value.body["code"] == "CHAT_TEMPLATE_FAILED"
    async with httpx.AsyncClient(base_url=queen.url) as anonymous:
        assert (await anonymous.get("/health")).status_code == 200
    # the worker was not blamed: completions on the same worker still work
    done = await client.completions.create(model="bomb", prompt="the hive", max_tokens=2)
    assert done.choices[0].text
