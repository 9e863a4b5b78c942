"""The body of `POST /v1/inference`, validated the same way wherever it is built.

A request carries either a `prompt` (sent to the model as it is) or chat
`messages`, which the worker renders with its model's chat template; exactly
one of the two. `chat_template` (with messages only) replaces the model's own
template, for a worker registered with one. Penalties, logit bias,
log-probabilities, a grammar or JSON schema and tools travel flat in the same
body and are parsed into `constraints` (see `constraints.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .constraints import FIELDS as CONSTRAINT_FIELDS
from .constraints import Constraints, parse_constraints
from .errors import ErrorCode, RbeeError
from .messages import ChatMessage, parse_messages

MAX_PROMPT_CHARS = 1_000_000
MAX_TEMPLATE_CHARS = 256 * 1024
MAX_STOP_SEQUENCES = 4


def _invalid(field_name: str, message: str) -> RbeeError:
    return RbeeError(
        ErrorCode.INVALID_REQUEST, f"{field_name}: {message}", status=400, details={"field": field_name}
    )


@dataclass(slots=True)
class InferenceRequest:
    prompt: str = ""
    messages: list[ChatMessage] | None = None
    chat_template: str | None = None
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    constraints: Constraints = field(default_factory=Constraints)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.messages is None:
            body["prompt"] = self.prompt
        else:
            body["messages"] = [m.to_json() for m in self.messages]
        if self.chat_template is not None:
            body["chat_template"] = self.chat_template
        sampling = ("max_tokens", "temperature", "top_p", "top_k", "seed")
        body.update({name: getattr(self, name) for name in sampling})
        body["stop"] = list(self.stop)
        body.update(self.constraints.to_json())
        return body

    @classmethod
    def from_json(cls, body: Any) -> InferenceRequest:
        if not isinstance(body, dict):
            raise _invalid("body", "expected a JSON object")
        unknown = set(body) - (set(cls.__dataclass_fields__) - {"constraints"}) - CONSTRAINT_FIELDS
        if unknown:
            name = sorted(unknown)[0]
            raise _invalid(name, "unknown field")
        req = _prompt_or_messages(cls(), body)
        req.max_tokens = _int(body, "max_tokens", req.max_tokens, 1, 1_000_000)
        req.temperature = _float(body, "temperature", req.temperature, 0.0, 2.0)
        req.top_p = _float(body, "top_p", req.top_p, 0.0, 1.0)
        req.top_k = _int(body, "top_k", req.top_k, 0, 1_000_000)
        seed = body.get("seed")
        if seed is not None:
            req.seed = _int(body, "seed", 0, 0, 2**31 - 1)
        stop = body.get("stop", [])
        if isinstance(stop, str):
            stop = [stop]
        if stop is None:
            stop = []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise _invalid("stop", "expected a string or a list of non-empty strings")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise _invalid("stop", f"at most {MAX_STOP_SEQUENCES} sequences")
        req.stop = stop
        req.constraints = parse_constraints(body, chat=req.messages is not None)
        return req


def _prompt_or_messages(req: InferenceRequest, body: dict[str, Any]) -> InferenceRequest:
    """Exactly one of `prompt` and `messages`; `chat_template` only beside messages."""
    prompt, messages, template = body.get("prompt"), body.get("messages"), body.get("chat_template")
    if messages is not None:
        if prompt is not None:
            raise _invalid("messages", "give either prompt or messages, not both")
        req.messages = parse_messages(messages)
        if sum(len(m.content) for m in req.messages) > MAX_PROMPT_CHARS:
            raise _invalid("messages", f"longer than {MAX_PROMPT_CHARS} characters in all")
        if template is not None:
            if not isinstance(template, str) or not template:
                raise _invalid("chat_template", "expected a non-empty string")
            if len(template) > MAX_TEMPLATE_CHARS:
                raise _invalid("chat_template", f"longer than {MAX_TEMPLATE_CHARS} characters")
            req.chat_template = template
        return req
    if template is not None:
        raise _invalid("chat_template", "only with messages")
    if not isinstance(prompt, str) or not prompt:
        raise _invalid("prompt", "expected a non-empty string (or chat messages instead)")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _invalid("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
    req.prompt = prompt
    return req


def _int(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, "expected an integer")
    if not lo <= value <= hi:
        raise _invalid(name, f"expected {lo}–{hi}, got {value}")
    return value


def _float(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(name, "expected a number")
    if not lo <= value <= hi:
        raise _invalid(name, f"expected {lo}–{hi}, got {value}")
    return float(value)
