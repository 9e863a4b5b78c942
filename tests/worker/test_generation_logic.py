"""Pure logic of a generation — UTF-8 hold-back and stop sequences — with a scripted runtime.

The runtime here is a list of byte strings, not a model: these tests pin down what
the worker does with whatever bytes a real runtime produces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_worker.app.generation import Generation, StopMatcher
from rbee_worker.protocol.request import InferenceRequest
from rbee_worker.runtimes import SamplingParams
from rbee_worker.tinymodel import write_tiny_model

EOS = 0


class ScriptedRuntime:
    name = "scripted"
    context_length = 64

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [b"", *pieces]
        self.generated = 0

    def tokenize(self, text: str) -> list[int]:
        return [1] * len(text)

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token]

    def is_eos(self, token: int) -> bool:
        return token == EOS

    def generate(self, prompt_tokens: list[int], params: SamplingParams) -> Iterator[int]:
        for token in range(1, len(self.pieces)):
            self.generated += 1
            yield token
        yield EOS

    def close(self) -> None:
        pass


async def run(pieces: list[bytes], **request: object) -> tuple[list[tuple[str, int]], Generation]:
    runtime = ScriptedRuntime(pieces)
    generation = Generation("r", InferenceRequest(prompt="p", **request), runtime)  # type: ignore[arg-type]
    generation.start(lambda fn: asyncio.get_running_loop().run_in_executor(None, fn))
    return [(t, i) async for batch in generation.batches() for t, i, _lp in batch], generation


async def test_multibyte_characters_are_held_until_whole() -> None:
    text = "aé🐝日b"
    data = text.encode()
    pieces = [data[i : i + 1] for i in range(len(data))]  # one byte per token
    out, generation = await run(pieces, max_tokens=100)
    assert "".join(t for t, _ in out) == text
    assert [t for t, _ in out] == ["a", "é", "🐝", "日", "b"]
    assert [i for _, i in out] == [0, 2, 6, 9, 10], "index of the token that completed each piece"
    assert generation.stats.tokens_out == len(data)
    assert generation.stats.stop_reason == "eos"


async def test_invalid_bytes_become_replacement_characters() -> None:
    out, _ = await run([b"\xff", b"ok", b"\xe2\x82"], max_tokens=10)
    assert "".join(t for t, _ in out) == "\ufffdok\ufffd"


async def test_max_tokens_budget_and_context_room() -> None:
    out, generation = await run([b"x"] * 20, max_tokens=5)
    assert "".join(t for t, _ in out) == "xxxxx"
    assert generation.stats.stop_reason == "max_tokens"


async def test_stop_sequence_split_across_tokens_is_never_emitted() -> None:
    out, generation = await run([b"hel", b"lo EN", b"D more"], max_tokens=10, stop=["END"])
    assert "".join(t for t, _ in out) == "hello "
    assert generation.stats.stop_reason == "stop"


async def test_prompt_longer_than_context_is_an_invalid_request() -> None:
    runtime = ScriptedRuntime([b"x"])
    generation = Generation("r", InferenceRequest(prompt="p" * 100), runtime)  # type: ignore[arg-type]
    generation.start(lambda fn: asyncio.get_running_loop().run_in_executor(None, fn))
    with pytest.raises(Exception, match="do not fit the 64-token context"):
        [piece async for batch in generation.batches() for piece in batch]
    assert runtime.generated == 0


@pytest.mark.parametrize(
    ("feeds", "emitted"),
    [
        (["ab", "c"], ["ab", "c"]),
        (["xx<", "/s", "> tail"], ["xx", "", ""]),
        (["<", "x"], ["", "<x"]),
    ],
)
def test_stop_matcher_holds_back_possible_prefixes(feeds: list[str], emitted: list[str]) -> None:
    matcher = StopMatcher(["</s>"])
    assert [matcher.feed(f)[0] for f in feeds] == emitted


def test_tiny_model_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=1).read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf", seed=1).read_bytes()
    c = write_tiny_model(tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b and a != c
    assert len(a) < 2_000_000
