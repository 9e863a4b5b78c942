"""What a hive refuses about RPC before any process exists: bad endpoints, dead or mismatched servers.

The servers here are small Python TCP servers that speak only the RPC HELLO (the
part of llama.cpp's protocol the hive checks): enough to make a version mismatch
real without building a second llama.cpp.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.rpc import (
    RpcVersion,
    check_rpc_id,
    check_versions,
    device_memory,
    hello,
    parse_endpoint,
)
from rbee_worker.protocol.spawn import SpawnRequest

from .conftest import Hive

PORTS = ("--port-min", "8700", "--port-max", "8799")


@contextmanager
def hello_server(version: tuple[int, int, int], size: int = 28) -> Iterator[str]:
    """Answers each connection's HELLO with `version`, then closes it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                head = conn.recv(9)
                if len(head) == 9:
                    conn.recv(struct.unpack("<Q", head[1:])[0])
                    conn.sendall(struct.pack("<Q", size) + bytes([*version, 0]) + bytes(size - 4))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_endpoints_and_ids_are_checked() -> None:
    assert parse_endpoint("10.0.0.5:50052") == ("10.0.0.5", 50052)
    assert parse_endpoint("[::1]:7") == ("::1", 7)
    for bad in ("nohost", "h:0", "h:70000", "h:12a", "0.0.0.0:5", "a;rm -rf /:5", "[zz]:5", ":5"):
        with pytest.raises(RbeeError, match="rpc"):
            parse_endpoint(bad)
    for bad_id in ("rpc-../../x", "worker-12345678", "rpc-1234567g"):
        with pytest.raises(RbeeError, match="invalid rpc server id"):
            check_rpc_id(bad_id)
    with pytest.raises(RbeeError, match="named twice"):
        SpawnRequest("m", rpc_servers=("h:1", "h:1"))
    with pytest.raises(RbeeError, match="llama-cpp runtime"):
        SpawnRequest("m", runtime="ctransformers", rpc_servers=("h:1",))
    for split in ((-1.0, 1.0), (0.0, 0.0), (float("nan"),)):
        with pytest.raises(RbeeError, match="tensor_split"):
            SpawnRequest("m", tensor_split=split)


def test_versions_follow_llama_cpp_rule() -> None:
    client = RpcVersion(7, 1)
    assert RpcVersion(7, 0).serves(client) and RpcVersion(7, 1).serves(client)
    assert not RpcVersion(7, 2).serves(client) and not RpcVersion(6, 0).serves(client)
    with pytest.raises(RbeeError, match=r"speaks protocol 8\.0\.0, this node's llama-cpp-python 7\.1\.0"):
        check_versions("h:1", RpcVersion(8, 0), client)
    header = "#define RPC_PROTO_MAJOR_VERSION 7\n#define RPC_PROTO_MINOR_VERSION 0\n"
    assert RpcVersion.from_header(header) == RpcVersion(7, 0, 0)


def test_hello_reads_the_server_version() -> None:
    with hello_server((7, 0, 3)) as endpoint:
        assert hello(endpoint) == RpcVersion(7, 0, 3)
    with hello_server((3, 0, 0), size=4) as endpoint, pytest.raises(RbeeError, match="refused the handshake"):
        hello(endpoint)


def test_device_memory_asks_only_a_server_of_our_version_and_wants_its_answers() -> None:
    """The real answers come from ggml-rpc-server in tests/keeper/test_split.py; here, what goes wrong."""
    with hello_server((99, 0, 0)) as endpoint, pytest.raises(RbeeError) as mismatch:
        device_memory(endpoint, RpcVersion(7, 0, 0))
    assert mismatch.value.code == "RPC_VERSION_MISMATCH" and "99.0.0" in mismatch.value.message
    with hello_server((7, 0, 0)) as endpoint, pytest.raises(RbeeError) as silent:
        device_memory(endpoint, RpcVersion(7, 0, 0))  # it hangs up after the HELLO
    assert silent.value.code == "RPC_SERVER_UNREACHABLE" and "no answer to command 15" in silent.value.message


@pytest.mark.llama
def test_hive_refuses_a_split_over_a_mismatched_or_dead_server(hive: Hive, tiny_model: Path) -> None:
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    hive.start(*PORTS)
    with hello_server((99, 0, 0)) as endpoint:
        err = hive.run("worker", "spawn", "--model", "tiny", "--rpc", endpoint, "--wait").error
    assert err["code"] == "RPC_VERSION_MISMATCH" and "speaks protocol 99.0.0" in err["message"], err
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    err = hive.run("worker", "spawn", "--model", "tiny", "--rpc", dead, "--wait").error
    assert err["code"] == "RPC_SERVER_UNREACHABLE" and dead in err["message"], err
    assert hive.ok("worker", "list")["workers"] == []  # refused before any process existed
    bad = hive.run("worker", "spawn", "--model", "tiny", "--rpc", "0.0.0.0:5")
    assert bad.rc == 2 and "wildcard" in bad.stderr, bad


def test_hive_on_a_wildcard_address_runs_no_rpc_server(hive: Hive) -> None:
    hive.start("--address", "0.0.0.0", "--advertise", "node.example", *PORTS)
    err = hive.run("rpc", "start").error
    assert "wildcard" in err["message"] and "no authentication" in err["message"], err
    assert hive.ok("rpc", "list")["servers"] == []
    assert hive.run("rpc", "stop", "rpc-../../etc").error["code"] == "INVALID_REQUEST"
