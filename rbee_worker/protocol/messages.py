"""Chat messages in the OpenAI shape, checked once where a request body is parsed.

Content may be a string or a list of text parts; the parts are joined, and any
other part (images, audio) is refused rather than dropped, since answering a
question about a picture without the picture would be silently wrong.
`developer` (OpenAI's newer name for `system`) is read as `system`, which is
what chat templates know.
"""

from __future__ import annotations

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

    def to_json(self) -> dict[str, str]:
        out = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
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
    return ChatMessage(
        "system" if role == "developer" else str(role), text, name if isinstance(name, str) else None
    )
