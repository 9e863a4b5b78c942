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

from .protocol.errors import ErrorCode, RbeeError

GGUF_MAGIC = b"GGUF"


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
    from gguf import GGUFReader

    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise _invalid(p, exc.strerror or str(exc)) from None
    if magic != GGUF_MAGIC:
        raise _invalid(p, "missing GGUF magic")
    try:
        reader = GGUFReader(str(p), "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise _invalid(p, f"unreadable header: {type(exc).__name__}: {exc}"[:300]) from None

    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise _invalid(p, f"truncated: tensor {tensor.name} ends at byte {end}, file has {size}")

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:
            return None

    arch = field("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _invalid(p, "no general.architecture")
    ctx = field(f"{arch}.context_length")
    if ctx is not None and (not isinstance(ctx, int) or not 1 <= ctx <= 10_000_000):
        raise _invalid(p, f"absurd {arch}.context_length: {ctx!r}")
    tokens = field("tokenizer.ggml.tokens")
    bos_id, eos_id = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")

    def token_text(token_id: Any) -> str | None:
        if isinstance(tokens, list) and isinstance(token_id, int) and 0 <= token_id < len(tokens):
            return str(tokens[token_id])
        return None

    return GGUFInfo(
        path=str(p),
        size=size,
        architecture=arch,
        tokenizer_model=field("tokenizer.ggml.model"),
        name=str(field("general.name") or p.stem),
        context_length=ctx,
        quantization=_quantization(reader),
        chat_template=field("tokenizer.chat_template"),
        bos_token=token_text(bos_id),
        eos_token=token_text(eos_id),
    )


def _quantization(reader: Any) -> str:
    """The most common tensor type among 2-D weights: what people call the quantization."""
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        if len(tensor.shape) >= 2:
            name = tensor.tensor_type.name
            counts[name] = counts.get(name, 0) + int(tensor.n_elements)
    return max(counts, key=lambda k: counts[k]) if counts else "unknown"
