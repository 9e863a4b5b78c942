"""Metadata reading on real files: good models, and files that must be refused cleanly."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from rbee_worker.gguf_info import read_gguf_info
from rbee_worker.protocol.errors import RbeeError


def test_tiny_and_real_models(tiny_model: Path, smollm2: Path) -> None:
    tiny = read_gguf_info(tiny_model)
    assert (tiny.architecture, tiny.tokenizer_model, tiny.context_length) == ("llama", "llama", 4096)
    assert (tiny.quantization, tiny.bos_token, tiny.eos_token) == ("F32", "<s>", "</s>")
    assert tiny.chat_template is None
    smol = read_gguf_info(smollm2)
    assert (smol.architecture, smol.tokenizer_model, smol.quantization) == ("llama", "gpt2", "Q4_1")
    assert smol.eos_token == "<|im_end|>" and "im_start" in (smol.chat_template or "")


def _refused(path: Path, reason: str) -> None:
    with pytest.raises(RbeeError) as info:
        read_gguf_info(path)
    assert info.value.code == "INVALID_MODEL_FILE"
    assert reason in info.value.message, info.value.message


@pytest.mark.parametrize("keep", [0, 4, 24, 300, 0.5, 0.99])
def test_truncated_anywhere_is_refused(tiny_model: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_model.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(RbeeError) as info:
        read_gguf_info(bad)
    assert info.value.code == "INVALID_MODEL_FILE"


def _header(kv: bytes, n_kv: int, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_hostile_headers_are_refused_without_allocating(tmp_path: Path) -> None:
    cases = {
        "counts": (_header(b"", n_kv=2**60), "absurd counts"),
        "array": (_header(_key("a") + struct.pack("<IIQ", 9, 4, 2**62), 1) + bytes(8), "absurd array length"),
        "type": (_header(_key("a") + struct.pack("<I", 77), 1) + b"\0" * 64, "unknown value type"),
        "string": (_header(struct.pack("<Q", 2**40), 1) + b"\0" * 64, "truncated header"),
        "version": (b"GGUF" + struct.pack("<IQQ", 99, 0, 0), "unsupported GGUF version"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        _refused(path, reason)


def test_absurd_context_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ctx.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(3_000_000_000)
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _refused(path, "absurd llama.context_length")
