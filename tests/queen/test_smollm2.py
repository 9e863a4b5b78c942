"""A real chat model through the queen: its own GGUF chat template, a real answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_worker.gguf_info import read_gguf_info

from ..worker_proc import WorkerProcess
from .conftest import serve_queen

pytestmark = [pytest.mark.slow, pytest.mark.llama]

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


async def test_smollm2_answers_with_its_chat_template(
    worker_factory: type[WorkerProcess], smollm2: Path
) -> None:
    info = read_gguf_info(smollm2)
    assert info.chat_template and "<|im_start|>" in info.chat_template
    worker = worker_factory(smollm2, backend="llama-cpp", ctx=2048)
    worker.wait_ready(timeout=120)
    async with serve_queen() as queen:
        await queen.register(
            worker, "smollm2", chat_template=info.chat_template, bos_token=info.bos_token,
            eos_token=info.eos_token, context_length=info.context_length,
        )  # fmt: skip
        client = queen.openai()
        whole = await client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=40, temperature=0
        )
        answer = whole.choices[0].message.content or ""
        assert "Paris" in answer
        assert whole.choices[0].finish_reason == "stop"  # the template's <|im_end|> ended the turn
        assert "<|im_" not in answer

        stream = await client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=40, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 10
