"""A fast, bounded parse of a GGUF header: key/values and tensor extents, no tensor data.

`gguf.GGUFReader` builds a numpy view for every element of every array field; on
a model with a 49k-entry vocabulary and its merges that takes ~3 s, paid on every
`models add` and every worker start. This reader walks the same format once,
skipping array elements it is not asked for, and takes the type tables (value
types, quantization block sizes) from the `gguf` package so nothing about the
format is restated here. Every count and length is checked against the file
size, so hostile metadata ends in a clean error instead of a huge allocation.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8


@dataclass(frozen=True, slots=True)
class _Tables:
    """The format's type tables, as the `gguf` package defines them."""

    value_type: Any  # gguf.GGUFValueType
    quant_type: Any  # gguf.GGMLQuantizationType
    quant_sizes: dict[Any, tuple[int, int]]
    scalars: dict[Any, str]  # scalar value type -> struct format


@functools.cache
def _tables() -> _Tables:
    """Import `gguf` on the first header read, not at import time.

    `gguf` pulls in numpy (~0.1 s); the hive's daemon start, `status` and `models
    list` import this module but never read a header, and should not pay for it.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

    formats = {"UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
               "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d"}  # fmt: skip
    scalars = {GGUFValueType[name]: fmt for name, fmt in formats.items()}
    return _Tables(GGUFValueType, GGMLQuantizationType, GGML_QUANT_SIZES, scalars)


_U64 = struct.Struct("<Q")


class HeaderError(ValueError):
    """The bytes are not a well-formed GGUF header."""


@dataclass(frozen=True, slots=True)
class TensorExtent:
    name: str
    type_name: str
    n_elements: int
    n_dims: int
    start: int
    end: int


@dataclass(slots=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    #: for array fields only their length is kept, except those listed in `keep_arrays`
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorExtent] = field(default_factory=list)


#: The header is read in windows this large: one `read` per window, not one per value.
WINDOW = 1 << 20


class _Cursor:
    """A read position over the file's first bytes, fetched window by window into memory.

    A 49k-entry vocabulary is ~150k values; unpacking them from memory with
    `struct.unpack_from` instead of a `read` and a `tell` each is what makes
    reading a real model's header take milliseconds.
    """

    def __init__(self, f: BinaryIO, size: int, tables: _Tables) -> None:
        self.f, self.size, self.tables = f, size, tables
        self.buf = bytearray()
        self.pos = 0

    def _need(self, n: int) -> None:
        """Have the `n` bytes at the read position in memory, or a truncated-header error."""
        end = self.pos + n
        if n >= 0 and end <= self.size and end > len(self.buf):
            self.buf += self.f.read(max(end - len(self.buf), WINDOW))
        if n < 0 or end > self.size or end > len(self.buf):
            raise HeaderError(f"truncated header (wanted {n} bytes at offset {self.pos})")

    def read(self, n: int) -> bytes:
        self._need(n)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        self._need(length)
        text = self.buf[self.pos : self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return text

    def strings(self, count: int, keep: bool) -> list[str]:
        """`count` length-prefixed strings, decoded when `keep` (a vocabulary), else only passed over."""
        out: list[str] = []
        for _ in range(count):
            if self.pos + 8 > len(self.buf):
                self._need(8)
            (length,) = _U64.unpack_from(self.buf, self.pos)
            self.pos += 8
            if self.pos + length > len(self.buf):
                self._need(length)
            if keep:
                out.append(self.buf[self.pos : self.pos + length].decode("utf-8", errors="replace"))
            self.pos += length
        return out

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"truncated header (skipping {n} bytes at offset {self.pos})")
        self.pos += n

    def value_type(self) -> Any:
        raw = self.unpack("<I")
        try:
            return self.tables.value_type(raw)
        except ValueError:
            raise HeaderError(f"unknown value type {raw}") from None

    def value(self, kind: Any) -> Any:
        if kind is self.tables.value_type.STRING:
            return self.string()
        if kind is self.tables.value_type.ARRAY:
            raise HeaderError("nested array")
        return self.unpack(self.tables.scalars[kind])


def read_header(f: BinaryIO, size: int, keep_arrays: frozenset[str] = frozenset()) -> GGUFHeader:
    tables = _tables()
    types = tables.value_type
    cur = _Cursor(f, size, tables)
    if cur.read(4) != MAGIC:
        raise HeaderError("missing GGUF magic")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise HeaderError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > size // 24 or n_kv > size // 12:
        raise HeaderError(f"absurd counts: {n_tensors} tensors, {n_kv} key/values in {size} bytes")
    header = GGUFHeader(version)
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.value_type()
        if vtype is not types.ARRAY:
            header.fields[key] = cur.value(vtype)
            continue
        item_type, count = cur.value_type(), cur.unpack("<Q")
        if count > size:
            raise HeaderError(f"{key}: absurd array length {count}")
        header.array_lengths[key] = count
        if item_type is types.STRING:
            kept = cur.strings(count, keep=key in keep_arrays)
            if key in keep_arrays:
                header.fields[key] = kept
        elif key in keep_arrays:
            header.fields[key] = [cur.value(item_type) for _ in range(count)]
        elif item_type is types.ARRAY:
            raise HeaderError(f"{key}: nested array")
        else:
            cur.skip(count * struct.calcsize(tables.scalars[item_type]))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > MAX_DIMS:
            raise HeaderError(f"tensor {name}: {n_dims} dimensions")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        raw_type, offset = cur.unpack("<I"), cur.unpack("<Q")
        infos.append((name, dims, raw_type, offset))
    alignment = header.fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise HeaderError(f"bad general.alignment {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    for name, dims, raw_type, offset in infos:
        try:
            qtype = tables.quant_type(raw_type)
            block, type_size = tables.quant_sizes[qtype]
        except (ValueError, KeyError):
            raise HeaderError(f"tensor {name}: unknown type {raw_type}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        start = data_start + offset
        end = start + n_elements // block * type_size
        header.tensors.append(TensorExtent(name, qtype.name, n_elements, len(dims), start, end))
    return header
