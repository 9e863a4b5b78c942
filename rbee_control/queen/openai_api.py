"""The OpenAI wire format: request bodies in, `chat.completion(.chunk)` and `text_completion` out.

Parsing maps OpenAI parameters onto the worker's `InferenceRequest` (which keeps
the one definition of ranges and defaults) and refuses, with a 400 naming the
parameter, what rbee cannot honour rather than silently ignoring it: `n` > 1,
`echo`, `suffix`, `best_of` > 1, audio and the like. Penalties, `logit_bias`,
`logprobs`, `seed`, `stop` and `response_format` (JSON mode and JSON schema, by
grammar) go to the worker; tools are `tools.py`. `top_k` and `repeat_penalty`
(llama.cpp's extensions) are passed on. docs/openai-fields.md lists every field.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from rbee_worker.protocol import events, jsontext
from rbee_worker.protocol.constraints import check_json_schema
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.request import InferenceRequest

from .tools import ToolCall, ToolPlan, plan_tools

DEFAULT_MAX_TOKENS = 256
Kind = Literal["chat", "completion"]

FINISH_REASONS = {events.STOP_EOS: "stop", events.STOP_STOP: "stop", events.STOP_MAX_TOKENS: "length"}
#: Passed to the worker under the same name.
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty",
            "repeat_penalty", "logit_bias")  # fmt: skip
#: Accepted with no effect on the answer (bookkeeping on OpenAI's side); anything else unknown is refused.
ADVISORY = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options",
                      "max_completion_tokens", "max_tokens", "model", "stream", "messages", "prompt", "n",
                      "tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "echo",
                      "suffix", "best_of", "modalities", "functions", "function_call"})  # fmt: skip


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
    tools: ToolPlan | None = None
    #: The worker's field name → the client's, for errors the worker reports (a schema it cannot use).
    field_names: dict[str, str] | None = None

    @property
    def logprobs(self) -> bool:
        return bool(self.sampling.get("logprobs"))

    def inference(self, chat_template: str | None = None) -> InferenceRequest:
        """The worker request: chat sends the messages (the worker renders them), completions the prompt."""
        body = dict(self.sampling)
        if self.kind == "chat":
            body["messages"] = self.messages
            if chat_template:
                body["chat_template"] = chat_template
            if self.tools is not None:
                body["tools"] = self.tools.tools
                if self.tools.schema is not None:
                    body["json_schema"] = self.tools.schema
        else:
            body["prompt"] = self.prompt
        try:
            return InferenceRequest.from_json(body)
        except RbeeError as exc:
            raise self.renamed(exc) from None

    def renamed(self, error: RbeeError) -> RbeeError:
        """`error` with the client's name for the field the worker named."""
        field = error.details.get("field")
        if not isinstance(field, str) or (name := (self.field_names or {}).get(field)) is None:
            return error
        message = (
            name + error.message[len(field) :] if error.message.startswith(f"{field}:") else error.message
        )
        return RbeeError(error.code, message, status=error.status, details={**error.details, "field": name})


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
    for name in SAMPLING:
        if body.get(name) is not None:
            sampling[name] = body[name]
    sampling.update(_logprobs(kind, body))
    field_names: dict[str, str] = {}
    schema = _response_schema(body.get("response_format"))
    if schema is not None:
        sampling["json_schema"] = schema
        field_names["json_schema"] = "response_format"
    request = OpenAIRequest(kind, model, stream, bool(options.get("include_usage")), sampling)
    if kind == "chat":
        if body.get("messages") is None:
            raise _invalid("messages", "expected a non-empty list")
        request.messages = body.get("messages")
        request.tools = plan_tools(body)
        if request.tools is not None and request.tools.schema is not None:
            if schema is not None:
                raise _invalid(
                    "response_format", "a JSON response format and a required tool call exclude each other"
                )
            field_names["json_schema"] = "tools"
        if request.tools is not None and stream and request.logprobs:
            # streamed text is held back while it may become a call, so chunks and tokens part ways
            raise _invalid("logprobs", "not with tools in a stream; ask without stream for both")
    else:
        if body.get("tools") is not None or body.get("tool_choice") is not None:
            raise _invalid("tools", "tools are for chat completions")
        request.prompt = _prompt(body.get("prompt"))
    request.field_names = field_names
    request.inference()  # validate messages and sampling fields now, with their own names
    return request


def _logprobs(kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
    """Chat: `logprobs` true plus `top_logprobs`; completions: `logprobs` is the number of alternatives."""
    value = body.get("logprobs")
    if kind == "chat":
        top = body.get("top_logprobs")
        if value is None or value is False:
            if top is not None:
                raise _invalid("top_logprobs", "only with logprobs: true")
            return {}
        if value is not True:
            raise _invalid("logprobs", "expected a boolean")
        return {"logprobs": True, "top_logprobs": 0 if top is None else top}
    if value is None:
        return {}
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
        raise _invalid("logprobs", "expected an integer from 0 to 5")
    return {"logprobs": True, "top_logprobs": value}


def _response_schema(fmt: Any) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for; None for text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _invalid("response_format", "expected an object")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise _invalid(
            "response_format", f"type {str(kind)[:40]!r}: expected text, json_object or json_schema"
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _invalid("response_format", "json_schema: expected an object with a name and a schema")
    return check_json_schema(spec.get("schema", {"type": "object"}), "response_format.json_schema.schema")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value:
        raise _invalid("prompt", "expected a non-empty string (token arrays and batches are not supported)")
    return value


def _refuse_unsupported(kind: Kind, body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise _invalid("n", "only n=1 is supported")
    for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
        if body.get(name) is not None:
            raise _invalid(name, "not supported")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _invalid("modalities", 'only ["text"] is supported')
    unknown = sorted(set(body) - ADVISORY - set(SAMPLING) - {"audio", "prediction", "reasoning_effort",
                                                             "web_search_options"})  # fmt: skip
    if unknown:
        raise _invalid(unknown[0], "unknown parameter")
    if kind == "completion":
        if body.get("echo"):
            raise _invalid("echo", "not supported")
        if body.get("suffix"):
            raise _invalid("suffix", "not supported")
        if body.get("best_of") not in (None, 1):
            raise _invalid("best_of", "only best_of=1 is supported")


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The worker's per-token entries as chat's `logprobs.content`."""
    return {
        "content": [
            {
                "token": e["token"],
                "logprob": e["logprob"],
                "bytes": e["bytes"],
                "top_logprobs": [
                    {"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                    for t in e.get("top", [])
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, `top_logprobs` as {token: logprob} maps."""
    offsets: list[int] = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top", [])} for e in entries],
        "text_offset": offsets,
    }


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

    def _chunk(self, choice: dict[str, Any], logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice, "logprobs": logprobs}],
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

    def logprob_chunk(self, text: str, entries: list[dict[str, Any]], offset: int) -> bytes:
        """A text chunk with its tokens' log-probabilities; `offset`: characters sent before it."""
        if self.kind == "chat":
            return _data(
                self._chunk({"delta": {"content": text}, "finish_reason": None}, chat_logprobs(entries))
            )
        lp = completion_logprobs(entries, offset)
        return _data(self._chunk({"text": text, "finish_reason": None}, lp))

    def tool_calls_chunk(self, calls: list[ToolCall]) -> bytes:
        """OpenAI's streamed calls: each call's id, name and whole arguments in one delta."""
        deltas = [{"index": i, **call.to_json()} for i, call in enumerate(calls)]
        return _data(self._chunk({"delta": {"tool_calls": deltas}, "finish_reason": None}))

    def final_chunk(self, stop_reason: str, tool_calls: bool = False) -> bytes:
        reason = "tool_calls" if tool_calls else finish_reason(stop_reason)
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
        self,
        text: str,
        stop_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        logprobs: list[dict[str, Any]] | None = None,
        tool_calls: list[ToolCall] | None = None,
    ) -> dict[str, Any]:
        lp: dict[str, Any] | None = None
        reason = finish_reason(stop_reason)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [c.to_json() for c in tool_calls],
                }
                reason = "tool_calls"
            choice: dict[str, Any] = {"message": message}
            obj = "chat.completion"
            if logprobs is not None:
                lp = chat_logprobs(logprobs)
        else:
            choice = {"text": text}
            obj = "text_completion"
            if logprobs is not None:
                lp = completion_logprobs(logprobs, 0)
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice, "logprobs": lp, "finish_reason": reason}],
            "usage": usage(prompt_tokens, completion_tokens),
        }
