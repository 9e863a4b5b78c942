"""The shape of a GGUF model that decides its memory: layers, KV heads, head size, bytes per layer.

Read from the header only (no tensor data), so the hive can plan a spawn on a
multi-GB file in milliseconds before anything loads. The numbers mirror what
llama.cpp allocates: repeating blocks (`blk.N.*`) can be offloaded one by one;
the output head goes with the last offload step; the token embedding stays on
the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gguf_header import HeaderError, TensorExtent, read_header
from .protocol.errors import ErrorCode, RbeeError

TOKENS_KEY = "tokenizer.ggml.tokens"


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What memory planning needs to know about a model (all sizes in bytes)."""

    architecture: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    context_length: int | None
    #: tensor bytes of each repeating block, in layer order
    layer_bytes: tuple[int, ...]
    #: the output head and final norm: on the device only when every layer is
    output_bytes: int
    #: the token embedding and anything else that never leaves the host
    host_bytes: int

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.host_bytes

    @property
    def kv_width(self) -> int:
        """K plus V elements per token per layer."""
        return self.n_head_kv * (self.head_dim_k + self.head_dim_v)


def _int(fields: dict[str, Any], key: str, default: int | None = None) -> int:
    value = fields.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}: {value!r}")
    return value


def shape_from_header(
    fields: dict[str, Any], tensors: list[TensorExtent], array_lengths: dict[str, int] | None = None
) -> ModelShape:
    """Build a shape from header fields and tensor extents; ValueError names a missing or bad key."""
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError("general.architecture missing")
    n_layers = _int(fields, f"{arch}.block_count")
    n_embd = _int(fields, f"{arch}.embedding_length")
    n_head = _int(fields, f"{arch}.attention.head_count")
    # per-layer head counts (an array) are kept only as a length by the reader: assume the widest, n_head
    n_head_kv = fields.get(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = n_head_kv if isinstance(n_head_kv, int) and n_head_kv >= 1 else n_head
    head_dim_k = _int(fields, f"{arch}.attention.key_length", max(1, n_embd // n_head))
    head_dim_v = _int(fields, f"{arch}.attention.value_length", head_dim_k)
    n_vocab = (array_lengths or {}).get(TOKENS_KEY) or fields.get(f"{arch}.vocab_size") or 0
    ctx = fields.get(f"{arch}.context_length")
    layers = [0] * n_layers
    output = host = 0
    for t in tensors:
        size = t.end - t.start
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < n_layers:
            layers[int(parts[1])] += size
        elif t.name.startswith(("output.", "output_norm.")):
            output += size
        else:
            host += size
    return ModelShape(
        architecture=arch,
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_vocab=int(n_vocab),
        context_length=ctx if isinstance(ctx, int) else None,
        layer_bytes=tuple(layers),
        output_bytes=output,
        host_bytes=host,
    )


def opaque_shape(architecture: str, weights_bytes: int) -> ModelShape:
    """A model whose attention shape the header does not give (no KV heads, say): weights only.

    Planning then counts the file and a small compute buffer, and the runtime has the last word.
    """
    return ModelShape(
        architecture=architecture,
        n_layers=1,
        n_embd=0,
        n_head=1,
        n_head_kv=0,
        head_dim_k=0,
        head_dim_v=0,
        n_vocab=0,
        context_length=None,
        layer_bytes=(0,),
        output_bytes=0,
        host_bytes=weights_bytes,
    )


def read_model_shape(path: str | os.PathLike[str]) -> ModelShape:
    """The shape of the model at `path`; `INVALID_MODEL_FILE` when it is not a readable GGUF.

    A readable file missing a shape key (an architecture without attention heads, a
    hand-made file) gets `opaque_shape`: planning must not refuse what a runtime may load.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            header = read_header(f, size)
    except OSError as exc:
        reason = exc.strerror or str(exc)
    except HeaderError as exc:
        reason = str(exc)
    else:
        try:
            return shape_from_header(header.fields, header.tensors, header.array_lengths)
        except ValueError:
            arch = header.fields.get("general.architecture")
            return opaque_shape(str(arch or "unknown"), sum(t.end - t.start for t in header.tensors))
    raise RbeeError(
        ErrorCode.INVALID_MODEL_FILE,
        f"{p}: cannot plan memory for this model ({reason})",
        status=422,
        details={"path": str(p), "reason": reason},
    )
