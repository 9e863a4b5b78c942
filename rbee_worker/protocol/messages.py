"""Chat messages in the OpenAI shape, checked once where a request body is parsed.

Content may be a string or a list of text parts; the parts are joined, and any
other part (images, audio) is refused rather than dropped, since answering a
question about a picture without the picture would be silently wrong.
`developer` (OpenAI's newer name for `system`) is read as `system`, which is
what chat templates know. An assistant turn may carry `tool_calls` (its
`arguments` JSON string becomes an object, as chat templates expect), and a
`tool` turn its `tool_call_id`, so a conversation with function results can be
sent back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import ErrorCode, RbeeError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_MESSAGES = 4096


def _invalid(message: str) -> RbeeError:
    return RbeeError(ErrorCode.INVALID_REQUEST, message, status=400, details={"field": "messages"})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None
    #: `[{"id", "type": "function", "function": {"name", "arguments": {...}}}]` on assistant turns
    tool_calls: tuple[dict[str, Any], ...] | None = None
    tool_call_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = [dict(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def parse_messages(messages: Any) -> list[ChatMessage]:
    """Check OpenAI messages and flatten content parts to text; a 400 naming the message otherwise."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: expected a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise _invalid(f"messages: at most {MAX_MESSAGES} messages")
    return [_message(index, message) for index, message in enumerate(messages)]


def _message(index: int, message: Any) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _invalid(f"{where}: expected an object")
    role = message.get("role")
    if role not in ROLES:
        raise _invalid(f"{where}.role: expected one of {', '.join(sorted(ROLES))}, got {role!r}")
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts: list[str] = []
        for part in content:
            text_part = isinstance(part, dict) and part.get("type") == "text"
            if not text_part or not isinstance(part.get("text"), str):
                raise _invalid(f"{where}.content: only text parts are supported")
            parts.append(part["text"])
        text = "".join(parts)
    else:
        raise _invalid(f"{where}.content: expected a string or a list of text parts")
    name = message.get("name")
    calls = message.get("tool_calls")
    tool_calls = None
    if calls is not None and calls != []:
        if role != "assistant":
            raise _invalid(f"{where}.tool_calls: only on assistant messages")
        tool_calls = _tool_calls(where, calls)
    call_id = message.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise _invalid(f"{where}.tool_call_id: expected a string")
    return ChatMessage(
        "system" if role == "developer" else str(role), text, name if isinstance(name, str) else None,
        tool_calls, call_id,
    )  # fmt: skip


def _tool_calls(where: str, calls: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(calls, list):
        raise _invalid(f"{where}.tool_calls: expected a list")
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid(f"{where}.tool_calls[{i}]: expected {{'function': {{'name', 'arguments'}}}}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise _invalid(f"{where}.tool_calls[{i}].function.arguments: not JSON") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise _invalid(f"{where}.tool_calls[{i}].function.arguments: expected a JSON object")
        call_id = call.get("id")
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": function["name"], "arguments": arguments},
        }
        if isinstance(call_id, str):
            entry["id"] = call_id
        out.append(entry)
    return tuple(out)
