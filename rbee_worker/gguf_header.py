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

import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


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

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size
        self.buf = bytearray()
        self.pos = 0

    def _need(self, n: int, what: str) -> None:
        end = self.pos + n
        if n < 0 or end > self.size:
            raise HeaderError(f"truncated header ({what} {n} bytes at offset {self.pos})")
        if end > len(self.buf):
            self.buf += self.f.read(max(end - len(self.buf), WINDOW))
            if end > len(self.buf):
                raise HeaderError(f"truncated header ({what} {n} bytes at offset {self.pos})")

    def read(self, n: int) -> bytes:
        self._need(n, "wanted")
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, "wanted")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        self._need(length, "wanted")
        text = self.buf[self.pos : self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return text

    def strings(self, count: int, keep: bool) -> list[str]:
        """`count` length-prefixed strings, decoded when `keep` (a vocabulary), else only passed over."""
        out: list[str] = []
        for _ in range(count):
            if self.pos + 8 > len(self.buf):
                self._need(8, "wanted")
            (length,) = _U64.unpack_from(self.buf, self.pos)
            self.pos += 8
            if self.pos + length > len(self.buf):
                self._need(length, "wanted")
            if keep:
                out.append(self.buf[self.pos : self.pos + length].decode("utf-8", errors="replace"))
            self.pos += length
        return out

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"truncated header (skipping {n} bytes at offset {self.pos})")
        self.pos += n

    def value(self, vtype: int) -> Any:
        kind = _value_type(vtype)
        if kind is GGUFValueType.STRING:
            return self.string()
        if kind is GGUFValueType.ARRAY:
            raise HeaderError("nested array")
        return self.unpack(_SCALARS[kind])


def _value_type(raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise HeaderError(f"unknown value type {raw}") from None


def read_header(f: BinaryIO, size: int, keep_arrays: frozenset[str] = frozenset()) -> GGUFHeader:
    cur = _Cursor(f, size)
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
        vtype = _value_type(cur.unpack("<I"))
        if vtype is not GGUFValueType.ARRAY:
            header.fields[key] = cur.value(vtype)
            continue
        item_type, count = _value_type(cur.unpack("<I")), cur.unpack("<Q")
        if count > size:
            raise HeaderError(f"{key}: absurd array length {count}")
        header.array_lengths[key] = count
        if item_type is GGUFValueType.STRING:
            kept = cur.strings(count, keep=key in keep_arrays)
            if key in keep_arrays:
                header.fields[key] = kept
        elif key in keep_arrays:
            header.fields[key] = [cur.value(item_type) for _ in range(count)]
        elif item_type is GGUFValueType.ARRAY:
            raise HeaderError(f"{key}: nested array")
        else:
            cur.skip(count * struct.calcsize(_SCALARS[item_type]))
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
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise HeaderError(f"tensor {name}: unknown type {raw_type}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        start = data_start + offset
        end = start + n_elements // block * type_size
        header.tensors.append(TensorExtent(name, qtype.name, n_elements, len(dims), start, end))
    return header
