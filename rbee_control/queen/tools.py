"""OpenAI tool calling on top of the worker's chat template and grammars.

The worker renders `tools` (with the model's template when it reads them, else
as a system message asking for `{"name": ..., "arguments": {...}}`). When a call
is required or named, the queen also sends a JSON schema built from the
functions' parameter schemas, so even a weak model answers with a call that
parses and matches. The answer is read back into `tool_calls`: a JSON object
with `name` and `arguments` (or Llama 3.1's `parameters`), bare, in a code
fence, or in Hermes/Qwen `<tool_call>` tags, one or several.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from rbee_worker.protocol.constraints import parse_tool_definitions
from rbee_worker.protocol.wire import invalid

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
#: What an answer that is a call starts with; anything else is plain text from its first character.
_CALL_STARTS = ("{", "[", "<tool_call>", "```")


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """The tools a request sends and how the answer is read: `choice` is auto, required or a name."""

    tools: list[dict[str, Any]]
    choice: str
    #: The schema a required or named call is constrained with; None for auto.
    schema: dict[str, Any] | None

    @property
    def names(self) -> set[str]:
        return {tool["function"]["name"] for tool in self.tools}

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls `text` makes, or None when it is an ordinary answer."""
        return parse_calls(text, self.names)


def plan_tools(body: dict[str, Any]) -> ToolPlan | None:
    """Tools and tool_choice from an OpenAI chat body; None when no tool may be called."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise invalid("functions", "the deprecated functions API is not supported; send tools instead")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "names a tool, but the request has no tools")
        return None
    definitions = parse_tool_definitions(tools, "tools")
    names = [tool["function"]["name"] for tool in definitions]
    if choice is None or choice == "auto":
        return ToolPlan(definitions, "auto", None)
    if choice == "none":
        return None
    if choice == "required":
        return ToolPlan(definitions, "required", _call_schema(definitions))
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
    ):
        name = choice["function"].get("name")
        if name not in names:
            raise invalid("tool_choice", f"names the function {str(name)[:64]!r}, which is not in tools")
        chosen = [tool for tool in definitions if tool["function"]["name"] == name]
        return ToolPlan(chosen, name, _call_schema(chosen))
    raise invalid(
        "tool_choice", 'expected "none", "auto", "required" or {"type": "function", "function": {"name"}}'
    )


def _call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    alternatives = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"]["parameters"],
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def parse_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    stripped = text.strip()
    pieces = _TAGGED.findall(stripped) if "<tool_call>" in stripped else [stripped]
    calls: list[ToolCall] = []
    for piece in pieces:
        fenced = _FENCE.match(piece)
        try:
            value = json.loads(fenced.group(1) if fenced else piece)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _call(item, names)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def _call(item: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"], json.dumps(arguments, ensure_ascii=False))


class ToolStream:
    """Streams an answer that may be a call: text goes out at once unless it may still become one."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._held = ""
        self._text = plan.choice == "auto"  # a required or named call is never plain text
        self._decided = False

    def feed(self, text: str) -> str:
        """The text to stream now ("" while it might still be a call)."""
        if self._decided:
            return text
        self._held += text
        start = self._held.lstrip()
        if not start:
            return ""
        could_be_call = any(s.startswith(start[: len(s)]) or start.startswith(s) for s in _CALL_STARTS)
        if self._text and not could_be_call:
            self._decided = True
            out, self._held = self._held, ""
            return out
        return ""

    def finish(self) -> tuple[str, list[ToolCall] | None]:
        """What was held back: (text, None) for an ordinary answer, ("", calls) for a call."""
        held, self._held = self._held, ""
        if self._decided:
            return held, None
        calls = self.plan.calls(held)
        return ("", calls) if calls else (held, None)
