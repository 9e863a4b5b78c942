"""llama.cpp's RPC backend on the wire: endpoints, the HELLO handshake, the version rule.

A split worker places layers on `ggml-rpc-server` processes of other nodes. The
RPC protocol has no authentication and llama.cpp aborts the whole client process
(exit 134) when a server is unreachable or speaks another version, so whoever
starts such a worker first checks every endpoint here, from Python, where a
refusal is an ordinary error.

Version rule (llama.cpp's own): the server's major equals the client's and its
minor is not higher.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass, fields
from typing import Any

from .errors import ErrorCode, RbeeError
from .wire import invalid, opt_float, opt_int, reject_unknown, req_str, require_object

#: RPC_CMD_HELLO; llama.cpp pins this number across versions
CMD_HELLO = 14
#: rpc_cmd numbers of protocol 7 (a server of another major is refused before these are sent)
CMD_GET_DEVICE_MEMORY = 11
CMD_DEVICE_COUNT = 15
#: sizeof(rpc_msg_hello_req) since protocol 7: the connection capabilities
HELLO_REQUEST_SIZE = 24
#: major, minor, patch, padding, then the capabilities
HELLO_RESPONSE_SIZE = 4 + HELLO_REQUEST_SIZE

_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}")
_HEADER_VERSION_RE = re.compile(r"#define\s+RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)")


@dataclass(frozen=True, slots=True, order=True)
class RpcVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def serves(self, client: RpcVersion) -> bool:
        """Can a server of this version serve `client`? (llama.cpp's check, on the client side)"""
        return self.major == client.major and self.minor <= client.minor

    @classmethod
    def from_header(cls, text: str) -> RpcVersion | None:
        """From `ggml-rpc.h` (installed with llama-cpp-python), None when it names no version."""
        found = dict(_HEADER_VERSION_RE.findall(text))
        if "MAJOR" not in found or "MINOR" not in found:
            return None
        return cls(int(found["MAJOR"]), int(found["MINOR"]), int(found.get("PATCH", 0)))


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` too) → (host, port); anything else is INVALID_REQUEST."""
    if not isinstance(text, str):
        raise invalid("rpc", f"expected host:port, got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise invalid("rpc", f"not an IPv6 address in {text!r}") from None
    elif not sep or not _HOST_RE.fullmatch(host):
        raise invalid("rpc", f"expected host:port, got {text!r}")
    if not port_text.isdecimal() or not 0 < int(port_text) < 65536:
        raise invalid("rpc", f"port must be 1-65535 in {text!r}")
    if host in ("0.0.0.0", "::"):
        raise invalid("rpc", f"{text!r} is a wildcard, not an address to connect to")
    return host, int(port_text)


_RPC_ID_RE = re.compile(r"rpc-[0-9a-f]{8}")


def check_rpc_id(rpc_id: str) -> str:
    """An RPC server's id ends up in a path and on a command line: `rpc-` and 8 hex digits only."""
    if not isinstance(rpc_id, str) or not _RPC_ID_RE.fullmatch(rpc_id):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST, f"invalid rpc server id {rpc_id!r}", details={"id": rpc_id}
        )
    return rpc_id


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def hello(endpoint: str, timeout: float = 5.0) -> RpcVersion:
    """The protocol version an RPC server speaks; RPC_SERVER_UNREACHABLE when it does not answer.

    The server serves one client at a time: this connection is closed at once so
    the real client gets its turn.
    """
    try:
        with socket.create_connection(parse_endpoint(endpoint), timeout=timeout) as sock:
            return _greet(sock, endpoint)
    except OSError as exc:
        raise unreachable(endpoint, f"{type(exc).__name__}: {exc}") from None


def device_memory(endpoint: str, client: RpcVersion | None, timeout: float = 5.0) -> tuple[int, int]:
    """(free, total) bytes over every device the server offers, as llama.cpp asks before placing layers.

    The server must first answer the HELLO in a version `client` speaks (`check_versions`):
    only then are the version's command numbers sent. Only for a server no worker holds
    yet: it serves one client at a time.
    """
    try:
        with socket.create_connection(parse_endpoint(endpoint), timeout=timeout) as sock:
            server = _greet(sock, endpoint)
            if client is not None:
                check_versions(endpoint, server, client)
            (count,) = struct.unpack("<I", _command(sock, endpoint, CMD_DEVICE_COUNT, b"", 4))
            free = total = 0
            for device in range(count):
                answer = _command(sock, endpoint, CMD_GET_DEVICE_MEMORY, struct.pack("<I", device), 16)
                device_free, device_total = struct.unpack("<QQ", answer)
                free, total = free + device_free, total + device_total
            return free, total
    except OSError as exc:
        raise unreachable(endpoint, f"{type(exc).__name__}: {exc}") from None


def _greet(sock: socket.socket, endpoint: str) -> RpcVersion:
    sock.sendall(struct.pack("<BQ", CMD_HELLO, HELLO_REQUEST_SIZE) + bytes(HELLO_REQUEST_SIZE))
    head = _recv_exact(sock, 8)
    body = _recv_exact(sock, HELLO_RESPONSE_SIZE) if len(head) == 8 else b""
    if len(head) < 8 or struct.unpack("<Q", head)[0] != HELLO_RESPONSE_SIZE or len(body) < 4:
        raise RbeeError(
            ErrorCode.RPC_VERSION_MISMATCH,
            f"RPC server {endpoint} refused the handshake (it speaks another protocol version)",
            status=422,
            details={"endpoint": endpoint},
            hint="build ggml-rpc-server from the same llama.cpp sources as llama-cpp-python",
        )
    return RpcVersion(body[0], body[1], body[2])


def _command(sock: socket.socket, endpoint: str, cmd: int, payload: bytes, answer_size: int) -> bytes:
    """One request/answer after the HELLO: command byte, u64 size, payload; u64 size, answer."""
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    head = _recv_exact(sock, 8)
    body = _recv_exact(sock, answer_size) if len(head) == 8 else b""
    if len(head) < 8 or struct.unpack("<Q", head)[0] != answer_size or len(body) < answer_size:
        raise unreachable(endpoint, f"no answer to command {cmd}")
    return body


def unreachable(endpoint: str, why: str) -> RbeeError:
    return RbeeError(
        ErrorCode.RPC_SERVER_UNREACHABLE,
        f"RPC server {endpoint} is unreachable: {why}",
        status=502,
        details={"endpoint": endpoint},
    )


def check_versions(endpoint: str, server: RpcVersion, client: RpcVersion) -> None:
    """Refuse a pair llama.cpp would abort on, with both versions in the message."""
    if not server.serves(client):
        raise RbeeError(
            ErrorCode.RPC_VERSION_MISMATCH,
            f"RPC server {endpoint} speaks protocol {server}, this node's llama-cpp-python {client}: "
            "the major must be equal and the server's minor not higher",
            status=422,
            details={"endpoint": endpoint, "server": str(server), "client": str(client)},
            hint="rbee-keeper setup install --extras llama on both nodes (the same llama.cpp sources)",
        )


@dataclass(frozen=True, slots=True)
class RpcServerInfo:
    """One `ggml-rpc-server` a hive runs for a split worker (the hive API's and `rpc start`'s answer)."""

    id: str
    endpoint: str
    pid: int
    version: str
    threads: int | None = None
    #: how many clients are connected now (a split worker holds one connection while loaded)
    clients: int = 0
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, body: Any) -> RpcServerInfo:
        body = require_object(body)  # a newer hive may add fields: tolerated
        endpoint = req_str(body, "endpoint")
        parse_endpoint(endpoint)
        return cls(
            id=req_str(body, "id"),
            endpoint=endpoint,
            pid=opt_int(body, "pid", 1) or 0,
            version=req_str(body, "version"),
            threads=opt_int(body, "threads", 1),
            clients=opt_int(body, "clients", 0) or 0,
            started_at=opt_float(body, "started_at", 0) or 0.0,
        )


def parse_start_body(body: Any) -> int | None:
    """`POST /v1/rpc/start` body: `{threads?}` → threads."""
    body = require_object(body)
    reject_unknown(body, {"threads"})
    return opt_int(body, "threads", 1)


__all__ = [
    "RpcServerInfo",
    "RpcVersion",
    "check_rpc_id",
    "check_versions",
    "format_endpoint",
    "hello",
    "parse_endpoint",
    "parse_start_body",
    "unreachable",
]
