"""Compact JSON for streams (SSE `data:` lines, NDJSON): text no line splitter can cut.

JSON escapes control characters but leaves U+2028, U+2029 and U+0085 raw inside
strings. SSE ends lines only at CR and LF, but `str.splitlines` (and so httpx's
`aiter_lines`, which many SSE and NDJSON clients read with) and pre-2019
JavaScript treat them as line ends, and a token holding one would cut its event
in two. Every streamed JSON object is written here, escaped; the result is the
same JSON value.
"""

from __future__ import annotations

import json
from typing import Any

_SEPARATORS = (",", ":")


def escape_separators(text: str) -> str:
    """`text` (JSON) with U+2028, U+2029 and U+0085 written as `\\uXXXX` escapes."""
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
    return text


def dumps(value: Any) -> str:
    """Compact JSON of `value`, UTF-8 kept as is except the line-separator characters."""
    return escape_separators(json.dumps(value, ensure_ascii=False, separators=_SEPARATORS))


def dumps_bytes(value: Any) -> bytes:
    return dumps(value).encode()
