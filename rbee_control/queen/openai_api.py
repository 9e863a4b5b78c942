"""The OpenAI wire format: request bodies in, `chat.completion(.chunk)` and `text_completion` out.

Parsing maps OpenAI parameters onto the worker's `InferenceRequest` (which keeps
the one definition of ranges and defaults) and refuses, with a 400 naming the
parameter, what rbee cannot honour rather than silently ignoring it: `n` > 1,
logprobs, `echo`, `suffix`, `best_of` > 1, tools, non-text response formats.
`presence_penalty`/`frequency_penalty`/`user`/`logit_bias` and other advisory
fields are accepted and ignored. `top_k` (llama.cpp's extension) is passed on.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from rbee_worker.protocol import events, jsontext
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.request import InferenceRequest

DEFAULT_MAX_TOKENS = 256
Kind = Literal["chat", "completion"]

FINISH_REASONS = {events.STOP_EOS: "stop", events.STOP_STOP: "stop", events.STOP_MAX_TOKENS: "length"}


def _invalid(field: str, message: str) -> RbeeError:
    return RbeeError(ErrorCode.INVALID_REQUEST, f"{field}: {message}", details={"field": field})


@dataclass(slots=True)
class OpenAIRequest:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]
    messages: Any = None
    prompt: str | None = None

    def inference(self, chat_template: str | None = None) -> InferenceRequest:
        """The worker request: chat sends the messages (the worker renders them), completions the prompt."""
        body = dict(self.sampling)
        if self.kind == "chat":
            body["messages"] = self.messages
            if chat_template:
                body["chat_template"] = chat_template
        else:
            body["prompt"] = self.prompt
        return InferenceRequest.from_json(body)


def parse_request(kind: Kind, body: Any) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise _invalid("body", "expected a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "expected a non-empty string")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _invalid("stream", "expected a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _invalid("stream_options", "expected an object")
    _refuse_unsupported(kind, body)
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    sampling: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens}
    for name in ("temperature", "top_p", "top_k", "seed", "stop"):
        if body.get(name) is not None:
            sampling[name] = body[name]
    request = OpenAIRequest(kind, model, stream, bool(options.get("include_usage")), sampling)
    if kind == "chat":
        if body.get("messages") is None:
            raise _invalid("messages", "expected a non-empty list")
        request.messages = body.get("messages")
    else:
        request.prompt = _prompt(body.get("prompt"))
    request.inference()  # validate messages and sampling fields now, with their own names
    return request


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value:
        raise _invalid("prompt", "expected a non-empty string (token arrays and batches are not supported)")
    return value


def _refuse_unsupported(kind: Kind, body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise _invalid("n", "only n=1 is supported")
    if kind == "chat" and body.get("logprobs"):
        raise _invalid("logprobs", "not supported")
    if kind == "completion":
        if body.get("logprobs") is not None:
            raise _invalid("logprobs", "not supported")
        if body.get("echo"):
            raise _invalid("echo", "not supported")
        if body.get("suffix"):
            raise _invalid("suffix", "not supported")
        if body.get("best_of") not in (None, 1):
            raise _invalid("best_of", "only best_of=1 is supported")
    if body.get("tools") or body.get("functions"):
        raise _invalid("tools", "tool calling is not supported")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise _invalid("response_format", "only the text format is supported")


def finish_reason(stop_reason: str) -> str:
    return FINISH_REASONS.get(stop_reason, "stop")


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + jsontext.dumps_bytes(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Shapes:
    """Response objects for one request: same id, `created` and `model` on every chunk."""

    def __init__(self, kind: Kind, request_id: str, model: str, include_usage: bool = False) -> None:
        self.kind = kind
        self.id = f"chatcmpl-{request_id}" if kind == "chat" else f"cmpl-{request_id}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self._object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        # A text chunk is the same bytes around the JSON string of its text: built once,
        # so relaying a token costs one `json.dumps` of a string, not of the whole chunk.
        marker = f"text-{uuid.uuid4().hex}"
        template = self._text_chunk_object(marker)
        self._text_prefix, self._text_suffix = template.split(json.dumps(marker).encode(), 1)

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice, "logprobs": None}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunk(self) -> bytes | None:
        """Chat streams open with the assistant role; completions have no such chunk."""
        if self.kind != "chat":
            return None
        return _data(self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}))

    def text_chunk(self, text: str) -> bytes:
        return self._text_prefix + jsontext.dumps_bytes(text) + self._text_suffix

    def _text_chunk_object(self, text: str) -> bytes:
        if self.kind == "chat":
            return _data(self._chunk({"delta": {"content": text}, "finish_reason": None}))
        return _data(self._chunk({"text": text, "finish_reason": None}))

    def final_chunk(self, stop_reason: str) -> bytes:
        reason = finish_reason(stop_reason)
        if self.kind == "chat":
            return _data(self._chunk({"delta": {}, "finish_reason": reason}))
        return _data(self._chunk({"text": "", "finish_reason": reason}))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return _data(
            {
                "id": self.id,
                "object": self._object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(prompt_tokens, completion_tokens),
            }
        )

    def completion(
        self, text: str, stop_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        else:
            choice = {"text": text}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, **choice, "logprobs": None, "finish_reason": finish_reason(stop_reason)}
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }
