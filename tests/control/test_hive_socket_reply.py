"""Reading a hive's answer off its socket: whole answers parse, anything else is a clear error."""

from __future__ import annotations

import argparse

import pytest

from rbee_control.inventory.model import Node
from rbee_control.keeper.fleet_commands import positive_seconds
from rbee_control.node.hive_socket import hive_socket, parse_reply
from rbee_worker.protocol.errors import RbeeError

NODE = Node("n9", "ssh", "127.0.0.9", home="~/rbee")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "nothing"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10", "truncated"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", "truncated"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n{}", "truncated"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{x}", "not JSON"),
    ],
)
def test_a_garbled_answer_is_a_clear_error(raw: bytes, why: str) -> None:
    with pytest.raises(RbeeError) as caught:
        parse_reply(NODE, raw)
    assert why in caught.value.message and "n9" in caught.value.message


def test_a_whole_answer_is_read_by_its_length() -> None:
    raw = b'HTTP/1.1 404 Not Found\r\nContent-Length: 11\r\n\r\n{"a": true}trailing'
    assert parse_reply(NODE, raw) == (404, {"a": True})


def test_the_socket_is_in_the_nodes_home() -> None:
    assert hive_socket(NODE) == "~/rbee/hive.sock"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", "99999"])
def test_status_refuses_a_bad_timeout(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_seconds(value)
    assert positive_seconds("2.5") == 2.5
