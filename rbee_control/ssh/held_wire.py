"""What the keeper and its connection holder say to each other: one JSON line each way.

The holder (`held_daemon.py`) keeps SSH connections open between keeper runs, the
way OpenSSH's ControlPersist does for Ansible; the keeper asks it for one
exchange with a hive's Unix socket at a time. Both ends are this release (the
control socket's name carries the version), so the format needs no negotiation.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from rbee_control.inventory.model import Node, SshSettings
from rbee_worker.protocol.errors import ErrorCode, RbeeError

#: the longest request line the holder reads (a hive request is a few hundred bytes)
REQUEST_LINE_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """Send `request` to the Unix socket `path` on the node, return what it answers (≤ `limit`)."""

    node: str
    host: str
    port: int
    user: str | None
    key: str | None
    known_hosts: str
    connect_timeout: float
    path: str
    request: bytes
    limit: int

    @classmethod
    def for_node(
        cls, node: Node, known_hosts: str, connect_timeout: float, path: str, request: bytes, limit: int
    ) -> ExchangeRequest:
        ssh = node.ssh
        if ssh is None:
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"node {node.name} is not an ssh node")
        where = (ssh.host, ssh.port, ssh.user, ssh.key)
        return cls(node.name, *where, known_hosts, connect_timeout, path, request, limit)

    def node_settings(self) -> Node:
        """The part of the inventory's node that the connection needs."""
        ssh = SshSettings(host=self.host, port=self.port, user=self.user, key=self.key)
        return Node(name=self.node, transport="ssh", address=self.host, ssh=ssh)

    def to_line(self) -> bytes:
        body = {
            "node": self.node,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key": self.key,
            "known_hosts": self.known_hosts,
            "connect_timeout": self.connect_timeout,
            "path": self.path,
            "request": base64.b64encode(self.request).decode(),
            "limit": self.limit,
        }
        return json.dumps(body).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ExchangeRequest:
        d = _object(line)
        try:
            return cls(
                node=_str(d, "node"),
                host=_str(d, "host"),
                port=int(d["port"]),
                user=_opt_str(d, "user"),
                key=_opt_str(d, "key"),
                known_hosts=_str(d, "known_hosts"),
                connect_timeout=float(d["connect_timeout"]),
                path=_str(d, "path"),
                request=base64.b64decode(_str(d, "request"), validate=True),
                limit=int(d["limit"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad exchange request: {exc}") from None


@dataclass(frozen=True, slots=True)
class ExchangeReply:
    """The socket's answer, or the error the node's connection or socket gave."""

    reply: bytes | None = None
    error: RbeeError | None = None

    def to_line(self) -> bytes:
        if self.error is not None:
            err = self.error
            body: dict[str, Any] = {
                "error": {
                    "code": err.code,
                    "message": err.message,
                    "status": err.status,
                    "details": err.details,
                    "hint": err.hint,
                }
            }
        else:
            body = {"reply": base64.b64encode(self.reply or b"").decode()}
        return json.dumps(body, default=str).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ExchangeReply:
        d = _object(line)
        try:
            if isinstance(d.get("error"), dict):
                e = d["error"]
                details = e.get("details")
                hint = e.get("hint")
                return cls(
                    error=RbeeError(
                        _str(e, "code"),
                        _str(e, "message"),
                        status=int(e["status"]),
                        details=details if isinstance(details, dict) else {},
                        hint=hint if isinstance(hint, str) else None,
                    )
                )
            return cls(reply=base64.b64decode(_str(d, "reply"), validate=True))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad exchange reply: {exc}") from None


def _object(line: bytes) -> dict[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _str(d: dict[str, Any], key: str) -> str:
    value = d[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{key} must be a string or null")
    return value
