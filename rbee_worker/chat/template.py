"""Turn chat messages into one prompt string, the way the model was trained to read them.

The template is the GGUF's own `tokenizer.chat_template` (or one a request
passes, for a worker registered with it), rendered in a bounded jinja2 sandbox
(`sandbox.py`) with the helpers Hugging Face's `apply_chat_template` provides
(`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text),
`add_generation_prompt=True`, and the model's `bos_token` and `eos_token` from
the GGUF metadata. Compiled templates are cached by their text.

- **One BOS.** When the runtime adds BOS itself as it tokenizes (the file says
  so) and the rendered text begins with the BOS text (Llama, Mistral and Gemma
  templates write `{{ bos_token }}`), that text is removed, so the prompt starts
  with one BOS token, not two.
- **Stops.** The EOS text and the end-of-turn markers the template writes
  (`<|im_end|>`, `<|eot_id|>`, ...) become stop sequences, besides the runtime's
  own EOS/EOT tokens, so a turn ends where the template ends turns.
- **Fallback.** Without a template (base models, the tiny test model), or with
  one that does not compile, the prompt is a plain transcript, one
  `Role: content` line per message ending in `Assistant:`, and `"\\nUser:"` is a
  stop sequence so the model answers once instead of writing both sides:

      System: You are terse.
      User: Hi
      Assistant:
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import jinja2
from jinja2.exceptions import TemplateError

from ..protocol.errors import ErrorCode, RbeeError
from ..protocol.messages import ChatMessage
from .sandbox import BoundedSandbox, TemplateLimitError, bounded_sandbox
from .tools import template_knows_tools, with_tools_as_text

FALLBACK_STOP = "\nUser:"
#: End-of-turn markers of common template families; those a template writes become stops.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
#: The smallest output cap; larger contexts allow 16 characters per token of context.
MIN_OUTPUT_CHARS = 256 * 1024

TemplateSource = Literal["gguf", "request", "fallback"]


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    prompt: str
    stop: tuple[str, ...] = ()
    source: TemplateSource = "gguf"


def output_cap(context_length: int) -> int:
    return max(MIN_OUTPUT_CHARS, 16 * context_length)


def template_failed(message: str, reason: str) -> RbeeError:
    return RbeeError(
        ErrorCode.CHAT_TEMPLATE_FAILED, message[:500], status=422,
        details={"field": "messages", "reason": reason},
    )  # fmt: skip


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


@functools.lru_cache(maxsize=4)
def _environment(max_chars: int) -> BoundedSandbox:
    env = bounded_sandbox(
        max_chars=max_chars, trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.set_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def compile_template(source: str, max_chars: int) -> jinja2.Template | None:
    """The compiled template, or None when it does not compile (the fallback is used instead)."""
    try:
        return _environment(max_chars).from_string(source)
    except TemplateError:
        return None
    except (RecursionError, MemoryError):  # absurdly nested source
        return None


def fallback_prompt(messages: list[ChatMessage]) -> str:
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """What the worker knows about its model for chat; `render` is blocking and bounded in size only."""

    template: str | None
    bos_token: str | None = None
    eos_token: str | None = None
    runtime_adds_bos: bool = False
    max_chars: int = MIN_OUTPUT_CHARS

    @property
    def source(self) -> TemplateSource:
        """`gguf` when the model's template compiles, else `fallback`; compiles (cached) on first use."""
        if self.template and compile_template(self.template, self.max_chars) is not None:
            return "gguf"
        return "fallback"

    def render(
        self,
        messages: list[ChatMessage],
        template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedPrompt:
        """Render with `template` (a request's) or the model's; errors are 400 or 422 for the client.

        Tools go to a template that reads them; otherwise into a system message (`tools.py`).
        """
        source: TemplateSource = "request" if template else "gguf"
        text = template or self.template
        compiled = compile_template(text, self.max_chars) if text else None
        native_tools = compiled is not None and template_knows_tools(text)
        if not native_tools and (tools or any(m.tool_calls or m.role == "tool" for m in messages)):
            messages, tools = with_tools_as_text(messages, tools), None
        if compiled is None:
            return RenderedPrompt(fallback_prompt(messages), (FALLBACK_STOP,), "fallback")
        assert text is not None
        prompt = self._render(compiled, messages, tools)
        if self.runtime_adds_bos and self.bos_token and prompt.startswith(self.bos_token):
            prompt = prompt[len(self.bos_token) :]
        return RenderedPrompt(prompt, self._stops(text), source)

    def _render(
        self, compiled: jinja2.Template, messages: list[ChatMessage], tools: list[dict[str, Any]] | None
    ) -> str:
        variables = {
            "messages": [m.to_json() for m in messages],
            "add_generation_prompt": True,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "tools": tools,
            "documents": None,
        }
        out: list[str] = []
        size = 0
        try:
            for piece in compiled.generate(variables):
                size += len(piece)
                if size > self.max_chars:
                    raise template_failed(
                        f"the chat template's output exceeds {self.max_chars} characters", "output"
                    )
                out.append(piece)
        except TemplateLimitError as exc:
            raise template_failed(str(exc), "limit") from None
        except TemplateError as exc:
            raise RbeeError(
                ErrorCode.INVALID_REQUEST, f"messages: the model's chat template refused them: {exc}"[:500],
                status=400, details={"field": "messages"},
            ) from None  # fmt: skip
        except RbeeError:
            raise
        except Exception as exc:  # a template is code from a model file; it may fail in any way
            raise template_failed(f"the chat template failed: {type(exc).__name__}: {exc}", "error") from None
        return "".join(out)

    def _stops(self, text: str) -> tuple[str, ...]:
        stops = [self.eos_token] if self.eos_token else []
        stops += [m for m in END_OF_TURN_MARKERS if m in text and m != self.eos_token]
        return tuple(stops)
