"""Grammars, JSON schemas, penalties, logit bias and log-probabilities on a real worker (tiny model)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from rbee_worker.app.constraints import prepare_constraints
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.request import InferenceRequest

from ..worker_proc import WorkerProcess
from .sse import collect, text_of

pytest.importorskip("llama_cpp")

#: The tiny model's random bytes in `name` test that no control character gets into a JSON string
#: (invalid UTF-8 becomes U+FFFD, which JSON allows).
SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 12},
    },
    "required": ["count", "ok", "colour", "name"],
    "additionalProperties": False,
}


async def test_json_schema_output_parses_and_matches(shared_tiny_worker: WorkerProcess) -> None:
    async with shared_tiny_worker.async_client() as client:
        for seed in (1, 2, 3, 4, 5, 6):
            body = {"prompt": "the bee", "max_tokens": 400, "seed": seed, "json_schema": SCHEMA}
            events = await collect(client, body)
            assert events[-1].name == "end" and events[-1].data["stop_reason"] == "eos", events[-1]
            value = json.loads(text_of(events))
            assert set(value) == {"count", "ok", "colour", "name"} and isinstance(value["name"], str)
            assert isinstance(value["count"], int) and isinstance(value["ok"], bool)
            assert value["colour"] in ("red", "green", "blue")


async def test_a_gbnf_grammar_constrains_the_text(shared_tiny_worker: WorkerProcess) -> None:
    async with shared_tiny_worker.async_client() as client:
        events = await collect(
            client, {"prompt": "x", "max_tokens": 50, "seed": 4, "grammar": 'root ::= ("yes" | "no") "!"'}
        )
    assert text_of(events) in ("yes!", "no!")
    assert events[-1].data["stop_reason"] == "eos"


async def test_logprobs_come_with_each_token(shared_tiny_worker: WorkerProcess) -> None:
    async with shared_tiny_worker.async_client() as client:
        body = {"prompt": "the bee", "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 3}
        events = await collect(client, body)
    tokens = [e for e in events if e.name == "token"]
    entries = [entry for e in tokens for entry in e.data["lp"]]
    assert len(entries) == events[-1].data["tokens_out"] == 8
    for entry in entries:
        assert entry["logprob"] <= 0 and len(entry["top"]) == 3
        top = [t["logprob"] for t in entry["top"]]
        assert top == sorted(top, reverse=True)
        # greedy: the chosen token is the most likely one
        assert math.isclose(entry["logprob"], top[0], abs_tol=1e-5)
        assert bytes(entry["bytes"]).decode(errors="replace") == entry["token"]
    assert (
        "".join(e.data["t"] for e in tokens).encode()
        == b"".join(bytes(entry["bytes"]) for entry in entries).decode(errors="replace").encode()
    )


async def test_logit_bias_and_penalties_change_the_greedy_text(shared_tiny_worker: WorkerProcess) -> None:
    base = {"prompt": "the bee", "max_tokens": 12, "temperature": 0}
    async with shared_tiny_worker.async_client() as client:
        plain = await collect(client, {**base, "logprobs": True})
        first = plain[1].data["lp"][0]["bytes"]
        assert len(first) == 1  # the tiny vocabulary: 3 specials, then one token per byte
        banned = {str(first[0] + 3): -100}
        biased = text_of(await collect(client, {**base, "logit_bias": banned}))
        penalised = text_of(await collect(client, {**base, "repeat_penalty": 2.0, "frequency_penalty": 1.5}))
        again = text_of(await collect(client, base))
    assert again == text_of(plain), "greedy is repeatable"
    assert not biased.encode().startswith(bytes(first)) and biased != again
    assert penalised != again


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"grammar": 'root ::= "a'}, "grammar"),
        ({"grammar": 'root ::= root "a"'}, "grammar"),
        ({"grammar": 'other ::= "a"'}, "grammar"),
        ({"json_schema": {"$ref": "#/nowhere"}}, "json_schema"),
        ({"json_schema": {"type": "strnig"}}, "json_schema"),
        ({"json_schema": {"type": "string", "pattern": "(("}}, "json_schema"),
        ({"json_schema": "{}"}, "json_schema"),
        ({"grammar": 'root ::= "a"', "json_schema": {}}, "grammar"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repeat_penalty": "1"}, "repeat_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
async def test_bad_constraints_are_a_400_naming_the_field(
    shared_tiny_worker: WorkerProcess, extra: dict[str, object], field: str
) -> None:
    async with shared_tiny_worker.async_client() as client:
        response = await client.post("/v1/inference", json={"prompt": "x", "max_tokens": 2, **extra})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["details"]["field"] == field
        after = await collect(client, {"prompt": "x", "max_tokens": 2})
    assert after[-1].name == "end", "the worker is unharmed"


async def test_tools_need_messages_and_render_into_the_prompt(shared_tiny_worker: WorkerProcess) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "weather?"}]
    async with shared_tiny_worker.async_client() as client:
        events = await collect(client, {"messages": messages, "tools": [tool], "max_tokens": 2})
        bad = await client.post(
            "/v1/inference",
            json={"messages": messages, "tools": [{**tool, "function": {"name": "bad name!"}}]},
        )
    assert events[-1].name == "end" and events[-1].data["prompt_tokens"] > 60  # the tool's text is in
    assert bad.status_code == 400 and bad.json()["error"]["details"]["field"] == "tools[0].function.name"


@dataclass
class _TextOnlyRuntime:
    """What the worker knows of a runtime when it checks features: a name and the features."""

    name: str = "ctransformers"
    features: frozenset[str] = frozenset({"repeat_penalty", "penalty_last_n", "tools"})


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"json_schema": {"type": "object"}}, "json_schema"),
        ({"grammar": 'root ::= "a"'}, "grammar"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"3": 1}}, "logit_bias"),
    ],
)
async def test_a_runtime_without_the_feature_refuses_it_by_name(extra: dict[str, object], field: str) -> None:
    request = InferenceRequest.from_json({"prompt": "x", **extra})
    with pytest.raises(RbeeError) as caught:
        await prepare_constraints(request, _TextOnlyRuntime())  # type: ignore[arg-type]
    assert caught.value.status == 400 and caught.value.details["field"] == field
    assert "ctransformers" in caught.value.message
    honoured = InferenceRequest.from_json({"prompt": "x", "repeat_penalty": 1.2})
    assert await prepare_constraints(honoured, _TextOnlyRuntime()) is honoured  # type: ignore[arg-type]
