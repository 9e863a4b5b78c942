"""One HTTP request to a node's hive daemon on its Unix socket, through the node's transport.

Over SSH this is a streamlocal channel on the already-open connection: no Python
process starts on the node, so a fan-out over many nodes costs one round trip
each. The request says `Connection: close` and the answer is read to the end, so
the exchange needs nothing but a status line, headers and a `Content-Length` body.
"""

from __future__ import annotations

import json
from typing import Any

from rbee_control.inventory.model import Node
from rbee_control.ssh.command import NodePath
from rbee_control.ssh.transport import NodeTransport
from rbee_worker.protocol.errors import ErrorCode, RbeeError

#: `$RBEE_HOME/hive.sock`, as `rbee_control.hive.paths` names it on the node.
SOCKET_NAME = "hive.sock"


def hive_socket(node: Node) -> str:
    return NodePath(node.home).joinpath(SOCKET_NAME)


def _request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: hive\r\nAccept: application/json\r\nConnection: close\r\n\r\n".encode()
    )


def _bad_reply(node: Node, why: str) -> RbeeError:
    return RbeeError(
        ErrorCode.INTERNAL_ERROR,
        f"the hive on node {node.name} answered its socket with {why}",
        details={"node": node.name},
    )


def parse_reply(node: Node, raw: bytes) -> tuple[int, Any]:
    """(status, JSON body) of a whole HTTP/1.1 response; anything else is a clear error."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise _bad_reply(node, "nothing" if not raw else "a truncated answer")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _bad_reply(node, f"a status line that is not HTTP: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _bad_reply(node, "a chunked body (expected Content-Length)")
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > len(body):
            raise _bad_reply(node, "a truncated answer")
        body = body[: int(length)]
    try:
        return int(parts[1]), json.loads(body) if body else None
    except ValueError:
        raise _bad_reply(node, "a body that is not JSON") from None


async def hive_get(transport: NodeTransport, path: str) -> Any:
    """`GET path` on the node's hive socket; its JSON, or the hive's error raised as RbeeError.

    A daemon that is not running raises HIVE_NOT_RUNNING (from the transport).
    """
    node = transport.node
    raw = await transport.unix_exchange(hive_socket(node), _request(path))
    status, data = parse_reply(node, raw)
    if status >= 400:
        err = RbeeError.from_body(data, status=status)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            err.hint = data["error"].get("hint")
        raise err
    return data
