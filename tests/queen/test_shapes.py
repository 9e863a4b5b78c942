"""OpenAI chunk shapes: the precomputed text-chunk template equals encoding the whole chunk."""

from __future__ import annotations

import json

import pytest

from rbee_control.queen.openai_api import Shapes


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("text", ["Paris", "", 'quote " and \\ backslash', "line\nbreak é 🐝", "\x00\x1f"])
def test_text_chunk_template_matches_the_full_encoding(kind: str, include_usage: bool, text: str) -> None:
    shapes = Shapes(kind, "abc123", 'odd/"model"', include_usage)  # type: ignore[arg-type]
    chunk = shapes.text_chunk(text)
    assert chunk == shapes._text_chunk_object(text)
    parsed = json.loads(chunk.removeprefix(b"data: ").removesuffix(b"\n\n"))
    choice = parsed["choices"][0]
    assert (choice["delta"]["content"] if kind == "chat" else choice["text"]) == text
    assert parsed["model"] == 'odd/"model"' and parsed["id"].endswith("abc123")
    assert ("usage" in parsed) is include_usage
