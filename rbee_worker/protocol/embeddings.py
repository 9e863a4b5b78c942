"""`POST /v1/embeddings`: OpenAI's request body, parsed once for the worker and the queen.

`input` is one string or a list of strings (at most `MAX_INPUTS`, none empty);
token arrays are refused with a 400 naming `input`, as is anything else.
`encoding_format` is `float` (a list of numbers) or `base64` (the little-endian
float32 bytes, what the `openai` SDK asks for by default). `truncate` is rbee's
addition for Ollama's `/api/embed`: an input longer than the context is cut to
fit instead of refused. `user` is accepted and ignored; `dimensions` must equal
the model's own (checked by the worker, which knows it).

The answer is OpenAI's `{"object": "list", "data": [{"object": "embedding",
"index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}`.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

from .wire import invalid, opt_int, reject_unknown, require_object

ENCODINGS = ("float", "base64")
MAX_INPUTS = 2048
MAX_INPUT_CHARS = 1_000_000

_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "truncate")


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    input: tuple[str, ...]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    truncate: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"input": list(self.input), "encoding_format": self.encoding_format}
        if self.model is not None:
            body["model"] = self.model
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        if self.truncate:
            body["truncate"] = True
        return body

    @classmethod
    def from_json(cls, body: Any) -> EmbeddingRequest:
        body = require_object(body)
        reject_unknown(body, _FIELDS)
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise invalid("model", "expected a non-empty string")
        encoding = body.get("encoding_format")
        if encoding is None:
            encoding = "float"
        if encoding not in ENCODINGS:
            raise invalid("encoding_format", f"expected float or base64, got {encoding!r}")
        truncate = body.get("truncate", False)
        if not isinstance(truncate, bool):
            raise invalid("truncate", "expected true or false")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise invalid("user", "expected a string")
        return cls(
            input=parse_input(body.get("input")),
            model=model,
            encoding_format=encoding,
            dimensions=opt_int(body, "dimensions", 1),
            truncate=truncate,
        )


def parse_input(value: Any, name: str = "input") -> tuple[str, ...]:
    """One string or a non-empty list of non-empty strings, as a tuple."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise invalid(name, "expected a string or a non-empty list of strings")
    if len(items) > MAX_INPUTS:
        raise invalid(name, f"at most {MAX_INPUTS} inputs per request, got {len(items)}")
    for index, item in enumerate(items):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise invalid(name, "token arrays are not supported: send text")
        if not isinstance(item, str) or not item:
            raise invalid(name, f"item {index}: expected a non-empty string")
        if len(item) > MAX_INPUT_CHARS:
            raise invalid(name, f"item {index}: longer than {MAX_INPUT_CHARS} characters")
    return tuple(items)


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as the answer carries it: the numbers, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def decode_vector(value: Any) -> list[float]:
    """Either encoding back to numbers (the queen's Ollama routes; tests)."""
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    raise ValueError("an embedding is a list of numbers or a base64 string")


def embedding_response(
    vectors: list[list[float]], encoding_format: str, model: str, prompt_tokens: int
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


__all__ = [
    "ENCODINGS",
    "MAX_INPUTS",
    "EmbeddingRequest",
    "decode_vector",
    "embedding_response",
    "encode_vector",
    "parse_input",
]
