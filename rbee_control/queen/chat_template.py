"""Turn OpenAI chat messages into one prompt string, the way the model was trained to read them.

The template is the GGUF's own `tokenizer.chat_template` (jinja2), rendered in a
sandbox with the helpers Hugging Face's `apply_chat_template` provides
(`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text), with
`add_generation_prompt=True`, `bos_token` and `eos_token`. Templates come from
model files, which are untrusted input: the sandbox is immutable and compiled
templates are cached by their text.

Two adjustments:

- When the template itself writes `{{ bos_token }}` (Llama, Mistral, Gemma
  style), that leading BOS text is removed from the result, because the worker's
  runtime adds BOS itself when it tokenizes such models; keeping both would start
  the prompt with two BOS tokens, which degrades answers. Templates that never
  mention `bos_token` are left alone (SmolLM2's BOS text is `<|im_start|>`,
  which its template writes as the start of every turn).
- Without a template (base models, the tiny test model) the fallback is a plain
  transcript, one `Role: content` line per message, ending in `Assistant:`, and
  `"\\nUser:"` is added as a stop sequence (when the request leaves room for one)
  so the model answers once instead of writing both sides of the dialogue:

      System: You are terse.
      User: Hi
      Assistant:
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rbee_worker.protocol.errors import ErrorCode, RbeeError

FALLBACK_STOP = "\nUser:"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    prompt: str
    extra_stop: tuple[str, ...] = ()
    templated: bool = True


def _invalid(message: str, field: str = "messages") -> RbeeError:
    return RbeeError(ErrorCode.INVALID_REQUEST, message, status=400, details={"field": field})


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
    sort_keys: bool = False,
) -> str:  # fmt: skip
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template | None:
    """The compiled template, or None when it does not compile (the fallback is used instead)."""
    try:
        return _environment().from_string(source)
    except TemplateError:
        return None


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI messages and flatten content parts to text; images are refused, not dropped."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: expected a non-empty list")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
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
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise _invalid(f"{where}.content: only text parts are supported")
                parts.append(part["text"])
            text = "".join(parts)
        else:
            raise _invalid(f"{where}.content: expected a string or a list of text parts")
        normalized = {"role": "system" if role == "developer" else role, "content": text}
        if isinstance(message.get("name"), str):
            normalized["name"] = message["name"]
        out.append(normalized)
    return out


def fallback_prompt(messages: list[dict[str, Any]]) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def render_chat(
    messages: list[dict[str, Any]],
    template: str | None,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> RenderedPrompt:
    """Render normalized messages; a template's own `raise_exception` becomes a 400 for the client."""
    compiled = _compile(template) if template else None
    if compiled is None:
        return RenderedPrompt(fallback_prompt(messages), (FALLBACK_STOP,), templated=False)
    try:
        text = compiled.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            tools=None,
            documents=None,
        )
    except TemplateError as exc:
        raise _invalid(f"messages: the model's chat template refused them: {exc}") from None
    except Exception as exc:  # a template is code from a model file; it may fail in any way
        raise RbeeError(
            ErrorCode.INTERNAL_ERROR, f"the model's chat template failed: {type(exc).__name__}: {exc}"[:300]
        ) from None
    if bos_token and "bos_token" in (template or "") and text.startswith(bos_token):
        text = text[len(bos_token) :]
    return RenderedPrompt(text)
