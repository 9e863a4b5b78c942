"""Reading a model's answer as tool calls, and holding back streamed text that may become one (pure logic)."""

from __future__ import annotations

import json

import pytest

from rbee_control.queen.tools import ToolPlan, ToolStream, parse_calls, plan_tools
from rbee_worker.protocol.errors import RbeeError

NAMES = {"get_weather", "now"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '  {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ],
)
def test_the_common_call_shapes_parse(text: str) -> None:
    calls = parse_calls(text, NAMES)
    assert calls is not None and len(calls) == 1
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_")


def test_several_calls_parse_and_ordinary_answers_do_not() -> None:
    two = (
        '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "get_weather"}</tool_call>'
    )
    assert [c.name for c in parse_calls(two, NAMES) or []] == ["now", "get_weather"]
    listed = '[{"name": "now", "arguments": {}}, {"name": "now", "arguments": {}}]'
    assert len(parse_calls(listed, NAMES) or []) == 2
    ordinary = [
        "Paris is sunny.", '{"city": "Paris"}', '{"name": "rm_rf", "arguments": {}}',
        '{"name": "now", "arguments": 3}', '{"name": "now", "arguments": "not json"}', "",
    ]  # fmt: skip
    for text in ordinary:
        assert parse_calls(text, NAMES) is None, text


def test_streamed_text_is_held_only_while_it_may_be_a_call() -> None:
    plan = ToolPlan([TOOL], "auto", None)
    stream = ToolStream(plan)
    assert stream.feed("  ") == "" and stream.feed("Hel") == "  Hel" and stream.feed("lo") == "lo"
    assert stream.finish() == ("", None)
    call = ToolStream(plan)
    pieces = ['{"name": "get', '_weather", "arguments": ', '{"city": "Rome"}}']
    assert [call.feed(p) for p in pieces] == ["", "", ""]
    text, calls = call.finish()
    assert text == "" and calls is not None and calls[0].name == "get_weather"
    json_text = ToolStream(plan)
    assert json_text.feed('{"a": 1}') == ""
    assert json_text.finish() == ('{"a": 1}', None), "JSON that is no call is text after all"


def test_tool_choice_plans() -> None:
    assert plan_tools({"tools": [TOOL], "tool_choice": "none"}) is None
    assert plan_tools({}) is None
    auto = plan_tools({"tools": [TOOL]})
    assert auto is not None and auto.choice == "auto" and auto.schema is None
    named = plan_tools(
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    )
    assert named is not None and named.schema is not None
    assert named.schema["properties"]["name"] == {"const": "get_weather"}
    required = plan_tools({"tools": [TOOL, {**TOOL, "function": {"name": "now"}}], "tool_choice": "required"})
    assert required is not None and required.schema is not None and len(required.schema["anyOf"]) == 2
    for body, field in (
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TOOL, TOOL]}, "tools[1].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ):
        with pytest.raises(RbeeError) as caught:
            plan_tools(body)
        assert caught.value.details["field"] == field
