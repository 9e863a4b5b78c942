"""A real small model through the queen with the unmodified `openai` client: JSON mode, a JSON schema,
a tool call. SmolLM2-135M alone rarely writes valid JSON; the worker's grammar makes it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from rbee_worker.gguf_info import read_gguf_info

from ..worker_proc import WorkerProcess
from .conftest import serve_queen

pytestmark = [pytest.mark.slow, pytest.mark.llama]

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def valid_against(value: Any, schema: dict[str, Any]) -> bool:
    """Just what these schemas say: an object with exactly the required keys, strings or an enum."""
    if not isinstance(value, dict) or set(value) != set(schema["required"]):
        return False
    for key, rule in schema["properties"].items():
        if "enum" in rule and value[key] not in rule["enum"]:
            return False
        if rule.get("type") == "string" and not (isinstance(value[key], str) and len(value[key]) <= 40):
            return False
    return True


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(smollm2, log_dir=tmp_path_factory.mktemp("smol"), backend="llama-cpp", ctx=2048)
    try:
        process.wait_ready(timeout=120)
        yield process
    finally:
        process.kill()


@pytest.fixture
async def client(worker: WorkerProcess, smollm2: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    info = read_gguf_info(smollm2)
    async with serve_queen() as queen:
        await queen.register(
            worker, "smollm2", chat_template=info.chat_template, bos_token=info.bos_token,
            eos_token=info.eos_token, context_length=info.context_length,
        )  # fmt: skip
        yield queen.openai()


async def test_json_mode_and_json_schema(client: openai.AsyncOpenAI) -> None:
    ask = [{"role": "user", "content": "Give the capital of France as JSON with keys city and country."}]
    mode = await client.chat.completions.create(
        model="smollm2", messages=ask, max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(mode.choices[0].message.content or ""), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    shaped = await client.chat.completions.create(
        model="smollm2", messages=ask, max_tokens=60, temperature=0, response_format=fmt
    )
    value = json.loads(shaped.choices[0].message.content or "")
    assert valid_against(value, CITY), value
    assert shaped.choices[0].finish_reason == "stop"


async def test_a_tool_call(client: openai.AsyncOpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris? Use celsius."}]
    reply = await client.chat.completions.create(
        model="smollm2", messages=ask, max_tokens=60, temperature=0, tools=[WEATHER], tool_choice="required"
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    arguments = json.loads(calls[0].function.arguments)
    assert valid_against(arguments, WEATHER["function"]["parameters"]), arguments
    assert "paris" in arguments["city"].lower()
