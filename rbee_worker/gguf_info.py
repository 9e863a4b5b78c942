"""What a GGUF file says about itself, read without loading the weights.

Both the worker (to choose a runtime and a context length) and the hive (to fill
its catalog and refuse files that are not models) read metadata through here, so a
corrupt or truncated file is rejected the same way everywhere.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .gguf_header import HeaderError, TensorExtent, read_header
from .protocol.errors import ErrorCode, RbeeError

TOKENS_KEY = "tokenizer.ggml.tokens"
#: Model shape keys a runtime divides by or allocates from: zero crashes it (SIGFPE), huge exhausts it.
_SHAPE_LIMITS = (
    ("block_count", 1, 10_000),
    ("embedding_length", 1, 1_000_000),
    ("feed_forward_length", 1, 10_000_000),
    ("attention.head_count", 1, 100_000),
    ("attention.head_count_kv", 1, 100_000),
)


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    path: str
    size: int
    architecture: str
    tokenizer_model: str | None
    name: str
    context_length: int | None
    quantization: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _invalid(path: Path, reason: str) -> RbeeError:
    return RbeeError(
        ErrorCode.INVALID_MODEL_FILE,
        f"{path}: not a usable GGUF model ({reason})",
        status=422,
        details={"path": str(path), "reason": reason},
    )


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read and sanity-check metadata; raise `RbeeError(INVALID_MODEL_FILE)` on anything wrong."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            header = read_header(f, size, keep_arrays=frozenset({TOKENS_KEY}))
    except OSError as exc:
        raise _invalid(p, exc.strerror or str(exc)) from None
    except HeaderError as exc:
        raise _invalid(p, str(exc)) from None

    for tensor in header.tensors:
        if tensor.end > size:
            raise _invalid(p, f"truncated: tensor {tensor.name} ends at byte {tensor.end}, file has {size}")
    if not header.tensors:
        raise _invalid(p, "no tensors")

    fields = header.fields
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _invalid(p, "no general.architecture")
    ctx = fields.get(f"{arch}.context_length")
    if ctx is not None and (not isinstance(ctx, int) or not 1 <= ctx <= 10_000_000):
        raise _invalid(p, f"absurd {arch}.context_length: {ctx!r}")
    for key, low, high in _SHAPE_LIMITS:
        value = fields.get(f"{arch}.{key}")
        if value is not None and (not isinstance(value, int) or not low <= value <= high):
            raise _invalid(p, f"absurd {arch}.{key}: {value!r}")
    tokens = fields.get(TOKENS_KEY)

    def token_text(token_id: Any) -> str | None:
        if isinstance(tokens, list) and isinstance(token_id, int) and 0 <= token_id < len(tokens):
            return str(tokens[token_id])
        return None

    template = fields.get("tokenizer.chat_template")
    return GGUFInfo(
        path=str(p),
        size=size,
        architecture=arch,
        tokenizer_model=fields.get("tokenizer.ggml.model"),
        name=str(fields.get("general.name") or p.stem),
        context_length=ctx,
        quantization=_quantization(header.tensors),
        chat_template=template if isinstance(template, str) else None,
        bos_token=token_text(fields.get("tokenizer.ggml.bos_token_id")),
        eos_token=token_text(fields.get("tokenizer.ggml.eos_token_id")),
    )


def _quantization(tensors: list[TensorExtent]) -> str:
    """The most common tensor type among 2-D weights: what people call the quantization."""
    counts: dict[str, int] = {}
    for tensor in tensors:
        if tensor.n_dims >= 2:
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + tensor.n_elements
    return max(counts, key=lambda k: counts[k]) if counts else "unknown"
