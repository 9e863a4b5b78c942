"""The SSE parser shared by the keeper and the queen: any split of the bytes gives the same events."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from rbee_worker.protocol import events
from rbee_worker.protocol.events import Event, EventParser, iter_event_batches, iter_events

STREAM = (
    events.encode_event(events.STARTED, {"request_id": "r1", "model": "m"})
    + b": a comment line\n\n"
    + events.token_event("Hé", 0)
    + events.token_event("llo\nworld 🐝", 1)
    + events.encode_event(events.END, {"tokens_out": 2, "stop_reason": "eos"})
    + events.encode_done()
)
EXPECTED = [
    Event(events.STARTED, {"request_id": "r1", "model": "m"}),
    Event(events.TOKEN, {"t": "Hé", "i": 0}),
    Event(events.TOKEN, {"t": "llo\nworld 🐝", "i": 1}),
    Event(events.END, {"tokens_out": 2, "stop_reason": "eos"}),
]


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _parse_in_pieces(data: bytes, rng: random.Random) -> tuple[EventParser, list[tuple[bytes, Event]]]:
    parser = EventParser()
    parsed = [item for chunk in _split(data, rng) for item in parser.feed(chunk)]
    return parser, parsed + parser.close()


def test_every_split_of_the_bytes_gives_the_same_events_and_exact_bytes() -> None:
    rng = random.Random(7)
    expected_bytes = STREAM[: STREAM.index(b"data: [DONE]")].replace(b": a comment line\n\n", b"")
    for _ in range(200):
        parser, parsed = _parse_in_pieces(STREAM, rng)
        assert [event for _raw, event in parsed] == EXPECTED
        assert b"".join(raw for raw, _event in parsed) == expected_bytes
        assert parser.done


def test_crlf_streams_split_anywhere_even_between_cr_and_lf() -> None:
    rng = random.Random(11)
    for _ in range(200):
        _parser, parsed = _parse_in_pieces(STREAM.replace(b"\n", b"\r\n"), rng)
        assert [event for _raw, event in parsed] == EXPECTED


def test_nothing_after_done_is_parsed() -> None:
    parser = EventParser()
    assert parser.feed(events.encode_done() + events.token_event("late", 9)) == []
    assert parser.done and parser.feed(events.token_event("later", 10)) == [] and parser.close() == []


def test_crlf_line_endings_and_a_last_event_without_blank_line() -> None:
    parser = EventParser()
    got = parser.feed(b'event: token\r\ndata: {"t":"a","i":0}\r\n\r\nevent: end\ndata: {"tokens_out":1}')
    assert [e for _r, e in got] == [Event(events.TOKEN, {"t": "a", "i": 0})]
    assert [e for _r, e in parser.close()] == [Event(events.END, {"tokens_out": 1})]
    assert not parser.done


async def test_unicode_line_separators_inside_token_text_stay_inside_it() -> None:
    """JSON leaves U+2028, U+0085 and U+001C unescaped; `str.splitlines` (and httpx's
    `aiter_lines`) breaks lines there, SSE does not."""
    texts = ["a\u2028b", "c\x85d", "e\x1cf\x1dg\x1eh\u2029i"]
    body = b"".join(events.token_event(t, i) for i, t in enumerate(texts)) + events.encode_done()
    got = [e async for e in iter_events(_aiter([body[:7], body[7:]]))]
    assert [e.data["t"] for e in got] == texts


def test_a_broken_json_payload_is_an_error_not_a_silent_skip() -> None:
    with pytest.raises(ValueError):
        EventParser().feed(b"event: token\ndata: {not json\n\n")


async def _aiter(items: list) -> AsyncIterator:
    for item in items:
        yield item


async def test_event_and_batch_iterators_agree_and_read_to_the_end() -> None:
    chunks = [*_split(STREAM, random.Random(3)), events.token_event("after done", 9)]
    consumed: list[bytes] = []

    async def tracked() -> AsyncIterator[bytes]:
        async for chunk in _aiter(chunks):
            consumed.append(chunk)
            yield chunk

    assert [e async for e in iter_events(tracked())] == EXPECTED
    assert consumed == chunks, "the body is read to its end so the connection can be reused"

    batches = [batch async for batch in iter_event_batches(_aiter(chunks))]
    assert all(batches), "no empty batches"
    assert [e for batch in batches for _r, e in batch] == EXPECTED
