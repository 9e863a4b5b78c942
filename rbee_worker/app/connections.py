"""Slow clients hold no more than their share: a deadline for each request head, and connection caps.

uvicorn's httptools protocol waits for a request head for ever (its keep-alive
timer only runs between requests), so 300 clients each sending half a header keep
300 connections open (slowloris). `GuardedHttpToolsProtocol` closes a connection
whose request head is not complete within `head_timeout` seconds of the
connection opening or of the head's first byte, refuses a head larger than
`max_head_bytes`, and refuses a connection outright beyond `max_connections` in
all or `max_per_peer` from one address. The worker and the queen both serve with
it (`guarded_protocol` builds the class uvicorn instantiates per connection).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_remote_addr


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    #: Seconds a client has to send a complete request head (line and headers).
    head_timeout: float = 10.0
    #: Largest request head, in bytes (431 beyond).
    max_head_bytes: int = 64 * 1024
    #: Open connections in all; more are closed at once.
    max_connections: int = 1024
    #: Open connections from one client address (the queen's pool toward a worker stays far below).
    max_per_peer: int = 256

    def __post_init__(self) -> None:
        if self.head_timeout <= 0 or min(self.max_head_bytes, self.max_connections, self.max_per_peer) < 1:
            raise ValueError("connection limits must be positive")

    @property
    def uvicorn_concurrency(self) -> int:
        """uvicorn's own cap (503 beyond it) counts connections and running requests; ours comes first."""
        return self.max_connections + 1


class HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and connection caps."""

    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = get_remote_addr(transport)
        host = peer[0] if peer else None
        clients = (getattr(c, "client", None) for c in self.connections)
        from_peer = sum(1 for client in clients if client and client[0] == host)
        if len(self.connections) >= self.limits.max_connections or from_peer >= self.limits.max_per_peer:
            self._refused = True
            transport.abort()
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused and self.parser is not None:
            super().data_received(data)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.limits.max_head_bytes:
            self._head_too_large = True
            raise HeadTooLarge  # httptools stops parsing; uvicorn answers through send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse(431, "request head too large")
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, "request head not received in time")

    def _refuse(self, status: int, message: str) -> None:
        """Answer with `status` when no response is under way, then close the connection."""
        self._disarm()
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode()
            head = (
                f"content-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: {len(body)}"
            )
            self.transport.write(STATUS_LINE[status] + head.encode() + b"\r\n\r\n" + body)
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class to pass as uvicorn's `http=`, bound to `limits`."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
