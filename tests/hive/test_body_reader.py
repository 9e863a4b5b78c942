"""A download body read past h11: exact lengths, stalls, early closes, lies, and the chunked fallback.

A raw asyncio server on loopback writes each answer byte by byte as the test says,
so every case is a real HTTP exchange over a real socket with the real httpx client.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from rbee_control.hive.body_reader import body_chunks

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]
BODY = os.urandom(4 << 20)


@asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await answer(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/model.gguf"


def head(length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"HTTP/1.1 200 OK\r\n{size}{extra}Connection: keep-alive\r\n\r\n".encode()


def _fetch_blocking(url: str, read_timeout: float, stop: threading.Event | None) -> list[bytes]:
    with httpx.Client(timeout=read_timeout) as client, client.stream("GET", url) as resp:
        return list(body_chunks(resp, read_timeout, stop))


async def fetch(url: str, read_timeout: float = 10.0, stop: threading.Event | None = None) -> list[bytes]:
    """The downloader reads on a thread of its own; so does this, while the server answers on the loop."""
    return await asyncio.to_thread(_fetch_blocking, url, read_timeout, stop)


async def test_a_sized_body_arrives_whole_in_large_reads() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(BODY)) + BODY)
        await writer.drain()

    async with serving(answer) as url:
        chunks = await fetch(url)
    assert b"".join(chunks) == BODY
    assert max(map(len, chunks)) > 64 << 10  # read past h11, whose pieces are at most 64 KiB


async def test_bytes_past_the_declared_length_are_not_taken() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(head(1000) + BODY[:5000])
        await writer.drain()

    async with serving(answer) as url:
        assert b"".join(await fetch(url)) == BODY[:1000]


async def test_an_early_close_ends_the_body_short() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(BODY)) + BODY[: len(BODY) // 2])
        await writer.drain()

    async with serving(answer) as url:
        got = b"".join(await fetch(url))
    assert got == BODY[: len(got)] and len(got) < len(BODY)  # the downloader counts and resumes


def first_mib_then_wait(release: asyncio.Event) -> Answer:
    """An answer that sends its head and the body's first MiB, then nothing until `release` is set."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(BODY)) + BODY[: 1 << 20])
        await writer.drain()
        await release.wait()

    return answer


async def test_a_stalled_body_is_httpx_read_timeout() -> None:
    release = asyncio.Event()
    async with serving(first_mib_then_wait(release)) as url:
        try:
            with pytest.raises(httpx.ReadTimeout):
                await fetch(url, read_timeout=0.3)
        finally:
            release.set()


async def test_a_stop_request_ends_a_stalled_read() -> None:
    release = asyncio.Event()
    stop = threading.Event()
    async with serving(first_mib_then_wait(release)) as url:
        reading = asyncio.ensure_future(fetch(url, read_timeout=60.0, stop=stop))
        try:
            await asyncio.sleep(0.5)
            assert not reading.done()  # the server holds the rest back: the reader waits
            stop.set()
            got = b"".join(await asyncio.wait_for(reading, 10))  # well before the 60 s stall limit
        finally:
            release.set()
    assert got == BODY[: 1 << 20]


async def test_a_chunked_body_goes_through_h11() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(head(None))
        for start in range(0, len(BODY), 300_000):
            piece = BODY[start : start + 300_000]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with serving(answer) as url:
        chunks = await fetch(url)
    assert b"".join(chunks) == BODY


async def test_a_compressed_body_goes_through_h11_undecoded() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(head(3000, "Content-Encoding: gzip\r\n") + BODY[:3000])
        await writer.drain()

    async with serving(answer) as url:
        assert b"".join(await fetch(url)) == BODY[:3000]  # raw: the bytes as sent, never inflated
