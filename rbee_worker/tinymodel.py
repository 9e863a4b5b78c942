"""A tiny random-weight llama GGUF that every runtime can load in milliseconds.

Tests and smoke checks need a real model file without a hub; this one is ~1 MB,
deterministic for a seed, and uses an SPM vocabulary made of the 256 byte tokens
plus a few printable pieces, so sampled output is real (if meaningless) text.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX = 4096

_SPECIALS = [("<unk>", TokenType.UNKNOWN), ("<s>", TokenType.CONTROL), ("</s>", TokenType.CONTROL)]
_PIECES = (
    ["\u2581"]
    + list(string.ascii_letters + string.digits)
    + ["\u2581" + w for w in ("the", "a", "bee", "hive", "rbee")]
)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = [s for s, _ in _SPECIALS]
    types = [int(t) for _, t in _SPECIALS]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(TokenType.BYTE)] * 256
    tokens += _PIECES
    types += [int(TokenType.NORMAL)] * len(_PIECES)
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(_PIECES):
        scores[259 + i] = -float(i) / 100.0 - (0.0 if len(piece) > 1 else 1.0)
    return tokens, scores, types


def write_tiny_model(
    path: str | Path,
    seed: int = 0,
    name: str = "rbee-tiny",
    chat_template: str | None = None,
    split_max_tensors: int = 0,
) -> Path:
    """Write the tiny model to `path` (atomic) and return the path; it has no chat template unless given.

    `split_max_tensors` writes a split GGUF instead (`<stem>-00001-of-0000N.gguf` next to
    `path`, not atomic) and returns the first part.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    part = path.with_name(path.name + ".tmp") if not split_max_tensors else path
    writer = GGUFWriter(str(part), "llama", split_max_tensors=split_max_tensors)
    writer.add_name(name)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}.{t}.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = weight(n_vocab, N_EMBD)
    # A zero row gives the special tokens a logit of 0, far below the top-k cut of
    # the random others: streams run to max_tokens instead of stopping at random.
    output[: len(_SPECIALS)] = 0.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0]
    part.replace(path)
    return path
