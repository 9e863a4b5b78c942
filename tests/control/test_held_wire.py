"""The keeper ↔ connection-holder lines: what goes in comes out, and a bad line is refused."""

from __future__ import annotations

import pytest

from rbee_control.inventory.model import Node, SshSettings
from rbee_control.ssh.held_wire import ExchangeReply, ExchangeRequest
from rbee_worker.protocol.errors import RbeeError


def test_a_request_survives_the_line() -> None:
    node = Node("n2", "ssh", "10.0.0.2", ssh=SshSettings("10.0.0.2", 2222, "ops", "~/.ssh/id_ed25519"))
    sent = ExchangeRequest.for_node(
        node, "/k/known_hosts", 5.0, "~/rbee/hive.sock", b"GET /\r\n\x00\xff", 1024
    )
    got = ExchangeRequest.from_line(sent.to_line())
    assert got == sent
    assert got.node_settings().ssh == node.ssh and got.node_settings().name == "n2"


def test_a_reply_and_an_error_survive_the_line() -> None:
    assert ExchangeReply.from_line(ExchangeReply(reply=b"HTTP/1.1 200 OK\r\n\r\n{}").to_line()).reply == (
        b"HTTP/1.1 200 OK\r\n\r\n{}"
    )
    err = RbeeError("HOST_KEY_CHANGED", "n2 changed", details={"node": "n2"}, hint="rbee-keeper setup ...")
    back = ExchangeReply.from_line(ExchangeReply(error=err).to_line()).error
    assert back is not None
    assert (back.code, back.message, back.status, back.details, back.hint) == (
        err.code,
        err.message,
        err.status,
        err.details,
        err.hint,
    )


@pytest.mark.parametrize(
    "line",
    [b"", b"[]", b"{}", b'{"node": 1}', b'{"reply": "not base64!"}', b'{"error": {"code": "X"}}'],
)
def test_bad_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        ExchangeRequest.from_line(line)
    with pytest.raises(ValueError):
        ExchangeReply.from_line(line)


def test_a_ssh_node_is_required() -> None:
    with pytest.raises(RbeeError):
        ExchangeRequest.for_node(Node("local", "local", "127.0.0.1"), "/k", 5.0, "/s", b"", 1)
