"""Structured output, tool calls, log-probabilities and refusals through the official clients (tiny model).

The tiny model writes random bytes, so only a grammar can make it answer in
JSON: whatever parses here parses because the worker constrained it. Schemas
use numbers, booleans and enums, whose text is ASCII whatever bytes it drew.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from ..worker_proc import WorkerProcess
from .conftest import QUEEN_KEY, Queen, start_worker

pytest.importorskip("llama_cpp")

USER = [{"role": "user", "content": "Report."}]
REPORT = {
    "type": "object",
    "properties": {"count": {"type": "integer"}, "ok": {"type": "boolean"}, "unit": {"enum": ["c", "f"]}},
    "required": ["count", "ok", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for some days ahead.",
        "parameters": {
            "type": "object",
            "properties": {"days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
            "required": ["days", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def matches_report(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"count", "ok", "unit"}
        and isinstance(value["count"], int)
        and isinstance(value["ok"], bool)
        and value["unit"] in ("c", "f")
    )


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[WorkerProcess]:
    process = start_worker(tiny_model, tmp_path_factory.mktemp("structured"), ctx=4096)
    yield process
    process.kill()


@pytest.fixture
async def registered(queen: Queen, worker: WorkerProcess) -> Queen:
    await queen.register(worker, "tiny")
    return queen


async def test_json_schema_response_format_parses_streamed_or_not(registered: Queen) -> None:
    client = registered.openai()
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT}}
    whole = await client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=300,
        seed=5,
        response_format=fmt,
    )
    text = whole.choices[0].message.content or ""
    assert matches_report(json.loads(text)), text
    assert whole.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=300,
        seed=5,
        response_format=fmt,
        stream=True,
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == text


async def test_a_named_tool_call_comes_back_as_tool_calls(registered: Queen) -> None:
    client = registered.openai()
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = await client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=200,
        seed=3,
        tools=[WEATHER, CLOCK],
        tool_choice=choice,
    )
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"days", "unit"} and isinstance(arguments["days"], int)

    stream = await client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=200, seed=3, tools=[WEATHER, CLOCK], tool_choice=choice,
        stream=True,
    )  # fmt: skip
    chunks = [c async for c in stream]
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas if d.function] == [(0, "get_weather")]
    assert json.loads(deltas[0].function.arguments or "") == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_required_picks_one_of_the_tools_and_tool_results_go_back(registered: Queen) -> None:
    client = registered.openai()
    whole = await client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=200,
        seed=8,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
    )
    calls = whole.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_weather", "now")
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 21}'},
    ]
    answer = await client.chat.completions.create(
        model="tiny",
        messages=history,
        max_tokens=4,
        tools=[WEATHER, CLOCK],
        tool_choice="none",
    )
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.tool_calls is None


async def test_logprobs_for_chat_and_completions(registered: Queen) -> None:
    client = registered.openai()
    chat = await client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert content is not None and len(content) == 6
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content)  # greedy
    stream = await client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [t for c in [c async for c in stream] if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]  # fmt: skip
    assert [t.logprob for t in streamed] == [t.logprob for t in content]
    legacy = await client.completions.create(
        model="tiny", prompt="the bee", max_tokens=5, temperature=0, logprobs=3
    )
    lp = legacy.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 5
    assert lp.top_logprobs is not None and all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset is not None and lp.text_offset[0] == 0


def schema_format(schema: object) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


BAD_SCHEMA_TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": 5}},
}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (schema_format({"type": "strnig"}), "response_format.json_schema.schema"),
        (schema_format({"$ref": "#/no"}), "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tools": [BAD_SCHEMA_TOOL]}, "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "gone"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "logprobs": True, "stream": True}, "logprobs"),
        ({"n": 2}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"presence_penalty": 9}, "presence_penalty"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"mystery": 1}, "mystery"),
    ],
)  # fmt: skip
async def test_bad_input_is_400_with_param_and_the_worker_is_unharmed(
    registered: Queen, extra: dict[str, Any], param: str
) -> None:
    client = registered.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=extra)
    assert caught.value.body["code"] == "INVALID_REQUEST"
    assert caught.value.body["param"] == param, caught.value.body
    after = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    assert after.choices[0].finish_reason == "length"


async def test_ollama_format_schema_and_penalty_options(registered: Queen) -> None:
    api = ollama.AsyncClient(
        host=registered.url, headers={"Authorization": f"Bearer {QUEEN_KEY}"}, timeout=60
    )
    answer = await api.chat(
        model="tiny",
        messages=USER,
        format=REPORT,
        options={"num_predict": 300, "seed": 5, "repeat_penalty": 1.2},
    )
    assert matches_report(json.loads(answer.message.content or ""))
    with pytest.raises(ollama.ResponseError) as caught:
        await api.chat(model="tiny", messages=USER, format={"type": "object", "required": "all"})
    assert caught.value.status_code == 400 and "format" in caught.value.error
