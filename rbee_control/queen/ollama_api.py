"""Ollama's wire format for `/api/chat` and `/api/generate`: bodies in, NDJSON objects out.

A body is mapped onto the queen's `OpenAIRequest`, so routing, validation of
sampling values and the chat template are exactly those of the OpenAI routes.
Ollama's `options` become sampling: temperature, top_p, top_k, seed (negative:
random), num_predict → max_tokens (-1/-2 or absent: until the model stops or
the context is full), stop, repeat_penalty, presence_penalty,
frequency_penalty, repeat_last_n. `format: "json"` is JSON mode and a schema
object is a JSON schema, both enforced by the worker's grammar. What Ollama
honours and rbee cannot is refused with a 400 naming it: tools, images,
thinking, logprobs, suffix, custom templates, token contexts, and sampling
options the worker does not have when set to anything but their neutral value.
Ollama's load-time options (num_ctx, num_gpu, …) and `keep_alive` are accepted
and ignored: a worker's context, devices and lifetime are fixed by the hive, not
per request. Option names Ollama does not know are ignored, as Ollama does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from rbee_worker.protocol import events, jsontext
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .openai_api import OpenAIRequest, parse_request

Kind = Literal["chat", "generate"]

#: The largest `max_tokens` a worker takes; it caps it to the room left in the context.
UNLIMITED_TOKENS = 1_000_000
DONE_REASONS = {events.STOP_EOS: "stop", events.STOP_STOP: "stop", events.STOP_MAX_TOKENS: "length"}

#: Ollama option → the queen's sampling field.
SAMPLING_OPTIONS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "stop": "stop",
    "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repeat_last_n": "penalty_last_n",
}  # fmt: skip
#: Options whose Ollama default is also the worker's.
DEFAULTS: dict[str, object] = {
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repeat_last_n": 64,
}  # fmt: skip
_NO_DEFAULT = object()
#: Sampling the worker does not do: refused unless set to the value that changes nothing.
NEUTRAL_OPTIONS: dict[str, object] = {
    "mirostat": 0,
    "tfs_z": 1.0,
    "typical_p": 1.0,
    "min_p": 0.0,
}
#: Fixed when a worker starts (or meaningless for rbee): accepted and ignored.
LOAD_OPTIONS = frozenset({
    "numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
    "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
    "mirostat_tau", "mirostat_eta", "penalize_newline",
})  # fmt: skip
#: The queen's field names as the Ollama client knows them, for error messages.
FIELD_NAMES = {
    "max_tokens": "options.num_predict",
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "seed": "options.seed",
    "stop": "options.stop",
    "repeat_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "penalty_last_n": "options.repeat_last_n",
    "response_format": "format",
    "json_schema": "format",
}


def invalid(field: str, message: str) -> RbeeError:
    return RbeeError(ErrorCode.INVALID_REQUEST, f"{field}: {message}", status=400, details={"field": field})


@dataclass(slots=True)
class OllamaRequest:
    """A parsed `/api/chat` or `/api/generate` body; `parsed` is None for a load or unload request."""

    kind: Kind
    model: str
    stream: bool
    parsed: OpenAIRequest | None
    #: Load-only with `keep_alive: 0`: Ollama unloads the model; the queen leaves its workers running.
    unload: bool = False


def parse_model(body: Any) -> str:
    if not isinstance(body, dict):
        raise invalid("body", "expected a JSON object")
    model = body.get("model")
    if model is None:
        model = body.get("name")  # older clients
    if not isinstance(model, str) or not model:
        raise invalid("model", "expected a non-empty string")
    return model


def parse(kind: Kind, body: Any) -> OllamaRequest:
    model = parse_model(body)
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise invalid("stream", "expected a boolean")
    _refuse_unsupported(kind, body)
    sampling = _sampling(body.get("options"))
    response_format = _format(body.get("format"))
    if response_format is not None:
        sampling["response_format"] = response_format
    if kind == "chat":
        messages = body.get("messages")
        if messages is None or messages == []:  # Ollama: load the model, answer `done_reason: load`
            return _load_only(kind, model, stream, sampling, body)
        openai_body: dict[str, Any] = {"messages": _messages(messages)}
        openai_kind: Literal["chat", "completion"] = "chat"
    else:
        prompt = body.get("prompt")
        if prompt is None or prompt == "":
            return _load_only(kind, model, stream, sampling, body)
        if not isinstance(prompt, str):
            raise invalid("prompt", "expected a string")
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            raise invalid("system", "expected a string")
        if body.get("raw"):
            openai_body, openai_kind = {"prompt": prompt}, "completion"
        else:  # Ollama renders a non-raw prompt as one user turn with the model's template
            turns = [{"role": "system", "content": system}] if system else []
            openai_body = {"messages": [*turns, {"role": "user", "content": prompt}]}
            openai_kind = "chat"
    return OllamaRequest(
        kind, model, stream, _openai(openai_kind, {**openai_body, **sampling, "model": model})
    )


def _openai(kind: Literal["chat", "completion"], body: dict[str, Any]) -> OpenAIRequest:
    try:
        return parse_request(kind, body)
    except RbeeError as exc:
        raise _renamed(exc) from None


def _load_only(
    kind: Kind, model: str, stream: bool, sampling: dict[str, Any], body: dict[str, Any]
) -> OllamaRequest:
    """Nothing to generate; the options are still checked, so a bad one is an error here too."""
    _openai("completion", {**sampling, "model": model, "prompt": "-"})
    return OllamaRequest(kind, model, stream, None, _is_zero(body.get("keep_alive")))


def _is_zero(keep_alive: Any) -> bool:
    if isinstance(keep_alive, str):
        return keep_alive.strip() in ("0", "0s", "0m", "0h")
    return isinstance(keep_alive, int | float) and not isinstance(keep_alive, bool) and keep_alive == 0


def _renamed(error: RbeeError) -> RbeeError:
    """A validation error with the option's Ollama name (`options.num_predict`, not `max_tokens`)."""
    field = error.details.get("field")
    if not isinstance(field, str):
        return error
    if field.startswith("response_format."):  # a part of the schema
        name = "format" + field.removeprefix("response_format.json_schema.schema")
    elif (known := FIELD_NAMES.get(field)) is not None:
        name = known
    else:
        return error
    message = error.message
    if message.startswith(f"{field}:"):
        message = name + message[len(field) :]
    return RbeeError(error.code, message, status=error.status, details={**error.details, "field": name})


def _format(fmt: Any) -> dict[str, Any] | None:
    """Ollama's `format` as OpenAI's `response_format`: "json" is JSON mode, an object a JSON schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if not isinstance(fmt, dict):
        raise invalid("format", 'expected "json" or a JSON schema object')
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}


def _refuse_unsupported(kind: Kind, body: dict[str, Any]) -> None:
    if body.get("tools"):
        raise invalid("tools", "tool calling is not supported")
    if body.get("think") not in (None, False):
        raise invalid("think", "thinking output is not supported")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise invalid("logprobs", "not supported")
    if kind == "generate":
        if body.get("images"):
            raise invalid("images", "images are not supported (text models only)")
        if body.get("suffix"):
            raise invalid("suffix", "fill-in-the-middle is not supported")
        if body.get("template"):
            raise invalid("template", "custom templates are not supported; send raw with a rendered prompt")
        if body.get("context"):
            raise invalid("context", "token contexts are not supported; send the conversation to /api/chat")


def _messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI ones; the chat template checks roles and content as for OpenAI."""
    if not isinstance(messages, list):
        raise invalid("messages", "expected a list")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{index}]", "expected an object")
        if message.get("images"):
            raise invalid(f"messages[{index}].images", "images are not supported (text models only)")
        if message.get("tool_calls"):
            raise invalid(f"messages[{index}].tool_calls", "tool calling is not supported")
        out.append({"role": message.get("role"), "content": message.get("content")})
    return out


def _sampling(options: Any) -> dict[str, Any]:
    if options is None:
        return {"max_tokens": UNLIMITED_TOKENS}
    if not isinstance(options, dict):
        raise invalid("options", "expected an object")
    sampling: dict[str, Any] = {}
    for name, value in options.items():
        if value is None or name in LOAD_OPTIONS:
            continue
        if name in SAMPLING_OPTIONS:
            if DEFAULTS.get(name, _NO_DEFAULT) != value:  # a default is the worker's own: not sent
                sampling[SAMPLING_OPTIONS[name]] = value
        elif name == "seed":
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                continue  # Ollama's -1: a random seed
            sampling["seed"] = value
        elif name in NEUTRAL_OPTIONS:
            neutral = NEUTRAL_OPTIONS[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or value != neutral:
                why = f"not supported by rbee's workers (only {neutral}, which changes nothing)"
                raise invalid(f"options.{name}", why)
    sampling["max_tokens"] = _max_tokens(options.get("num_predict"))
    return sampling


def _max_tokens(value: Any) -> Any:
    if value is None or value in (-1, -2):
        return UNLIMITED_TOKENS
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise invalid("options.num_predict", f"expected at least 1, or -1 for no limit, got {value}")
    return value  # the worker request checks type and range


# --- responses ---------------------------------------------------------------


def now_iso() -> str:
    """RFC 3339 in UTC, the way Ollama writes `created_at` (Go's time.Time)."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def ndjson(obj: dict[str, Any]) -> bytes:
    """One line of NDJSON that no line splitter can cut.

    JSON already escapes control characters, but not U+0085, U+2028 or U+2029,
    which `str.splitlines` (and so httpx's `iter_lines`, which the Ollama client
    reads with) treats as line ends.
    """
    return jsontext.dumps_bytes(obj) + b"\n"


def done_reason(stop_reason: str) -> str:
    return DONE_REASONS.get(stop_reason, "stop")


@dataclass(frozen=True, slots=True)
class Timings:
    """Ollama's final counters; durations in nanoseconds."""

    total: float
    load: float
    prompt_eval_count: int
    prompt_eval: float
    eval_count: int
    eval: float

    def body(self) -> dict[str, int]:
        return {
            "total_duration": round(self.total * 1e9),
            "load_duration": round(self.load * 1e9),
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": round(self.prompt_eval * 1e9),
            "eval_count": self.eval_count,
            "eval_duration": round(self.eval * 1e9),
        }


class Shapes:
    """The objects of one `/api/chat` or `/api/generate` answer."""

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind = kind
        self.model = model

    def _content(self, text: str) -> dict[str, Any]:
        if self.kind == "chat":
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def chunk(self, text: str, created_at: str) -> dict[str, Any]:
        return {"model": self.model, "created_at": created_at, **self._content(text), "done": False}

    def final(self, text: str, reason: str, timings: Timings | None) -> dict[str, Any]:
        body = {"model": self.model, "created_at": now_iso(), **self._content(text), "done": True}
        body["done_reason"] = reason
        if timings is not None:
            body.update(timings.body())
        return body


def error_body(error: RbeeError) -> dict[str, Any]:
    """Ollama's error shape: one message string (its clients read nothing else)."""
    message = error.message
    if error.hint:
        message = f"{message} ({error.hint})"
    return {"error": message}
