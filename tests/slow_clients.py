"""Slowloris on loopback: many connections that each send half a request head and then wait."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator

#: Attackers come from another loopback address than the test's normal client, as a LAN host would.
ATTACKER = "127.0.0.2"
HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@contextlib.contextmanager
def half_open(host: str, port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections from `ATTACKER`, each holding a partial request head; all closed on exit."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((host, port), timeout=5, source_address=(ATTACKER, 0))
            held.append(sock)
            with contextlib.suppress(OSError):  # a connection over the cap is reset at once
                sock.sendall(HALF_HEAD)
        yield held
    finally:
        for sock in held:
            sock.close()


def closed_by_server(sock: socket.socket) -> tuple[bool, bytes]:
    """(closed, what the server wrote before closing), without blocking."""
    received = b""
    while True:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False, received
        try:
            chunk = sock.recv(65536)
        except OSError:  # reset
            return True, received
        if not chunk:
            return True, received
        received += chunk


def wait_all_closed(held: list[socket.socket], timeout: float) -> dict[str, int]:
    """Poll until the server closed every connection (bounded); count how each ended."""
    open_ = set(range(len(held)))
    outcome = {"408": 0, "silent": 0}
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        for index in list(open_):
            closed, data = closed_by_server(held[index])
            if closed:
                open_.discard(index)
                outcome["408" if data.startswith(b"HTTP/1.1 408") else "silent"] += 1
        if open_:
            time.sleep(0.2)
    outcome["open"] = len(open_)
    return outcome
