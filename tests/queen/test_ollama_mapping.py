"""Ollama bodies onto the queen's request: options mapping, refusals by name, NDJSON framing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rbee_control.queen.fleet import ModelEntry
from rbee_control.queen.ollama_api import UNLIMITED_TOKENS, ndjson, parse
from rbee_control.queen.ollama_models import details, parameter_size
from rbee_worker.protocol.errors import RbeeError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _refused(kind: str, body: dict[str, Any]) -> RbeeError:
    with pytest.raises(RbeeError) as caught:
        parse(kind, body)  # type: ignore[arg-type]
    assert caught.value.status == 400
    return caught.value


def test_options_map_onto_sampling() -> None:
    options = {"temperature": 0.2, "top_p": 0.5, "top_k": 7, "seed": 11, "num_predict": 9, "stop": ["x"]}
    req = parse("chat", {**CHAT, "options": options, "stream": False})
    assert req.parsed is not None and req.stream is False
    assert req.parsed.sampling == {
        "temperature": 0.2, "top_p": 0.5, "top_k": 7, "seed": 11, "max_tokens": 9, "stop": ["x"],
    }  # fmt: skip


def test_num_predict_absent_or_negative_runs_to_the_end_and_a_negative_seed_is_random() -> None:
    for options in (None, {}, {"num_predict": -1}, {"num_predict": -2}):
        req = parse("chat", {**CHAT, "options": options})
        assert req.parsed is not None and req.parsed.sampling["max_tokens"] == UNLIMITED_TOKENS
    req = parse("chat", {**CHAT, "options": {"seed": -1}})
    assert req.parsed is not None and "seed" not in req.parsed.sampling
    assert req.stream is True  # Ollama streams unless told otherwise


def test_load_options_and_unknown_options_are_ignored_neutral_ones_accepted() -> None:
    options = {"num_ctx": 8192, "num_gpu": 99, "num_thread": 4, "keep_this": 1, "repeat_penalty": 1.0}
    req = parse("chat", {**CHAT, "options": options, "keep_alive": "5m"})
    assert req.parsed is not None and set(req.parsed.sampling) == {"max_tokens"}


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"num_predict": 0}, "options.num_predict"),
        ({"num_predict": "many"}, "options.num_predict"),
        ({"temperature": 5}, "options.temperature"),
        ({"top_k": -3}, "options.top_k"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "options.stop"),
        ({"repeat_penalty": 11}, "options.repeat_penalty"),
        ({"presence_penalty": "high"}, "options.presence_penalty"),
        ({"repeat_last_n": -5}, "options.repeat_last_n"),
        ({"mirostat": 2}, "options.mirostat"),
    ],
)
def test_bad_or_unsupported_options_are_refused_with_their_ollama_name(options: dict, field: str) -> None:
    error = _refused("chat", {**CHAT, "options": options})
    assert error.details["field"] == field and error.message.startswith(f"{field}:")


@pytest.mark.parametrize(
    ("kind", "extra", "field", "words"),
    [
        ("chat", {"format": "yaml"}, "format", "JSON schema"),
        ("chat", {"format": {"type": "strnig"}}, "format", "not a JSON schema type"),
        ("chat", {"format": 3}, "format", "JSON schema"),
        ("chat", {"tools": [{"type": "function"}]}, "tools", "not supported"),
        ("chat", {"think": True}, "think", "not supported"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
            "messages[0].images",
            "",
        ),
        ("chat", {"messages": "hi"}, "messages", "list"),
        ("chat", {"stream": "yes"}, "stream", "boolean"),
        ("chat", {"model": ""}, "model", "non-empty"),
        ("generate", {"prompt": "x", "suffix": "y"}, "suffix", "fill-in-the-middle"),
        ("generate", {"prompt": "x", "context": [1, 2]}, "context", "/api/chat"),
        ("generate", {"prompt": "x", "template": "{{ .Prompt }}"}, "template", "raw"),
        ("generate", {"prompt": "x", "images": ["aGk="]}, "images", "text models"),
        ("generate", {"prompt": 5}, "prompt", "string"),
    ],
)
def test_what_rbee_cannot_do_is_refused_by_name(kind: str, extra: dict, field: str, words: str) -> None:
    body = {**CHAT, **extra} if kind == "chat" else {"model": "m", **extra}
    error = _refused(kind, body)
    assert error.details["field"] == field and words in error.message


def test_generate_renders_a_user_turn_unless_raw() -> None:
    req = parse("generate", {"model": "m", "prompt": "why", "system": "be brief"})
    assert req.parsed is not None and req.parsed.kind == "chat"
    assert req.parsed.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "why"},
    ]
    raw = parse("generate", {"model": "m", "prompt": "why", "raw": True})
    assert raw.parsed is not None and raw.parsed.kind == "completion" and raw.parsed.prompt == "why"


def test_an_empty_prompt_or_message_list_only_loads_the_model() -> None:
    assert parse("generate", {"model": "m"}).parsed is None
    assert parse("chat", {"model": "m", "messages": []}).parsed is None
    for keep_alive in (0, "0", "0s"):
        assert parse("generate", {"model": "m", "keep_alive": keep_alive}).unload
    assert not parse("generate", {"model": "m", "keep_alive": "5m"}).unload
    error = _refused("generate", {"model": "m", "options": {"temperature": -1}})  # checked all the same
    assert error.details["field"] == "options.temperature"


def test_ndjson_lines_cannot_be_split_by_unicode_line_ends() -> None:
    text = "a\u2028b\u2029c\x85d\ne\x1cf"
    line = ndjson({"response": text})
    assert line.endswith(b"\n") and len(line.decode().splitlines()) == 1
    assert json.loads(line)["response"] == text


def test_details_estimate_the_parameter_size_from_size_and_quantization() -> None:
    entry = ModelEntry("m", "n", size=1_000_000_000, architecture="llama", quantization="Q8_0")
    assert details(entry) == {
        "parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
        "parameter_size": "941M", "quantization_level": "Q8_0",
    }  # fmt: skip
    assert details(ModelEntry("m", "n"))["parameter_size"] == ""
    assert parameter_size(1_711_000_000) == "1.7B"
