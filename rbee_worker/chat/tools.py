"""Tools for a chat template that does not know them: a system message, and plain-text turns.

A template that reads `tools` (Qwen, Llama 3.1, Hermes, Mistral…) renders them
itself. For one that does not (SmolLM2, the fallback transcript), the
functions go into a system message that asks for a call as one JSON object
`{"name": ..., "arguments": {...}}` — the shape the queen parses, and the one
its grammar enforces when a call is required. Earlier calls and their results
become ordinary text, since such templates know neither `tool_calls` nor the
`tool` role (some refuse any role but system, user and assistant).
"""

from __future__ import annotations

import json
from typing import Any

from ..protocol.messages import ChatMessage

INSTRUCTIONS = (
    "You can call these functions:\n{functions}\n\n"
    "To call one, answer with only a JSON object and nothing else: "
    '{{"name": <function name>, "arguments": <object of arguments>}}. '
    "Otherwise answer normally."
)


def template_knows_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    lines = [json.dumps(tool["function"], ensure_ascii=False) for tool in tools]
    return INSTRUCTIONS.format(functions="\n".join(lines))


def with_tools_as_text(messages: list[ChatMessage], tools: list[dict[str, Any]] | None) -> list[ChatMessage]:
    """Messages for a template without tool support: the tools in the system turn, calls as text."""
    out: list[ChatMessage] = []
    for message in messages:
        if message.tool_calls:
            calls = [
                json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                for c in message.tool_calls
            ]
            text = "\n".join(filter(None, [message.content, *calls]))
            out.append(ChatMessage("assistant", text))
        elif message.role == "tool":
            label = message.name or message.tool_call_id or "the function"
            out.append(ChatMessage("user", f"Result of {label}: {message.content}"))
        else:
            out.append(ChatMessage(message.role, message.content, message.name))
    if tools:
        text = tools_system_text(tools)
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{text}")
        else:
            out.insert(0, ChatMessage("system", text))
    return out
