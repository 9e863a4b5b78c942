"""Connecting to real sshd nodes: pinned host keys, failures mapped to codes, channel cap, reconnect."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from rbee_control.inventory.model import Inventory, Node, SshSettings
from rbee_control.ssh.known_hosts import KnownHosts, fingerprint
from rbee_control.ssh.remote import SshTransport
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from tests.sshd import SshdFactory, SshdNode, free_port


def ssh_node(name: str, host: str, port: int, key: Path | str | None, tmp_path: Path) -> Node:
    return Node(
        name=name,
        transport="ssh",
        address=host,
        home=str(tmp_path / "homes" / name),
        ssh=SshSettings(host=host, port=port, user="root", key=str(key) if key else None),
    )


def node_for(sshd: SshdNode, tmp_path: Path, name: str = "n2") -> Node:
    return ssh_node(name, sshd.host, sshd.port, sshd.client_key, tmp_path)


async def expect_error(transport: SshTransport, code: str) -> RbeeError:
    with pytest.raises(RbeeError) as info:
        await transport.connect()
    assert info.value.code == code, info.value.message
    return info.value


async def test_two_nodes_are_two_servers(ssh_inventory: Inventory) -> None:
    seen = []
    for name in ("n2", "n3"):
        async with SshTransport(ssh_inventory.node(name)) as transport:
            result = await transport.run(["sh", "-c", 'echo "$SSH_CONNECTION"'])
            seen.append(result.stdout.split()[2])
    assert seen == ["127.0.0.2", "127.0.0.3"]


async def test_unknown_host_key_is_refused_with_its_fingerprint(
    sshd_nodes: list[SshdNode], known_hosts: KnownHosts, tmp_path: Path, attempts: list[str]
) -> None:
    sshd = sshd_nodes[0]
    transport = SshTransport(node_for(sshd, tmp_path), known_hosts=known_hosts)
    err = await expect_error(transport, ErrorCode.HOST_KEY_UNKNOWN)
    assert fingerprint(sshd.host_key) in err.message
    assert err.message.startswith(
        f"host key of node n2 (127.0.0.2:{sshd.port}) is not trusted yet: ssh-ed25519 "
    )
    assert err.hint is not None
    assert f"rbee-keeper setup add-node n2 --ssh-host 127.0.0.2 --ssh-port {sshd.port} --trust" in err.hint
    assert err.details["fingerprint"] == fingerprint(sshd.host_key)
    assert attempts == ["n2"], "an untrusted host key is not retried"
    assert not known_hosts.path.exists()


async def test_changed_host_key_is_refused_and_not_retried(
    sshd_nodes: list[SshdNode], known_hosts: KnownHosts, tmp_path: Path, attempts: list[str]
) -> None:
    sshd = sshd_nodes[0]
    impostor = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    known_hosts.trust(sshd.host, sshd.port, impostor)
    transport = SshTransport(node_for(sshd, tmp_path), known_hosts=known_hosts, backoff=(5.0,))
    err = await expect_error(transport, ErrorCode.HOST_KEY_CHANGED)
    assert fingerprint(impostor) in err.message
    assert fingerprint(sshd.host_key) in err.message
    assert "CHANGED" in err.message
    assert attempts == ["n2"], "a host-key mismatch must not be retried"
    assert known_hosts.lookup(sshd.host, sshd.port)[0].public_data == impostor.public_data


async def test_trusting_the_fetched_key_lets_the_connection_through(
    sshd_nodes: list[SshdNode], known_hosts: KnownHosts, tmp_path: Path
) -> None:
    from rbee_control.ssh.known_hosts import fetch_host_key

    sshd = sshd_nodes[1]
    key = await fetch_host_key(sshd.host, sshd.port)
    assert fingerprint(key) == fingerprint(sshd.host_key)
    known_hosts.trust(sshd.host, sshd.port, key)
    async with SshTransport(node_for(sshd, tmp_path, "n3"), known_hosts=known_hosts) as transport:
        assert (await transport.run(["echo", "ok"])).stdout == "ok\n"


async def test_refused_port_fails_fast_after_three_attempts(
    known_hosts: KnownHosts, tmp_path: Path, attempts: list[str]
) -> None:
    port = free_port("127.0.0.4")
    transport = SshTransport(ssh_node("down", "127.0.0.4", port, None, tmp_path), known_hosts=known_hosts)
    err = await expect_error(transport, ErrorCode.CONNECTION_FAILED)
    assert err.message == f"cannot connect to down at 127.0.0.4:{port} after 3 attempts: connection refused"
    assert err.details["attempts"] == 3 and attempts == ["down"] * 3


@pytest.fixture
def silent_listener() -> Iterator[tuple[str, int]]:
    """A TCP port that accepts connections and never speaks SSH."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.4", 0))
    sock.listen(16)
    try:
        yield "127.0.0.4", sock.getsockname()[1]
    finally:
        sock.close()


async def test_silent_server_times_out(
    silent_listener: tuple[str, int], known_hosts: KnownHosts, tmp_path: Path, attempts: list[str]
) -> None:
    host, port = silent_listener
    known_hosts.trust(host, port, asyncssh.generate_private_key("ssh-ed25519").convert_to_public())
    node = ssh_node("mute", host, port, None, tmp_path)
    transport = SshTransport(node, known_hosts=known_hosts, connect_timeout=0.3, backoff=(0.05, 0.1))
    err = await expect_error(transport, ErrorCode.CONNECTION_TIMEOUT)
    # A timeout is not retried: a hung node costs one connect timeout, not three.
    assert err.message.endswith("timed out (0.3s per attempt)") and "attempts" not in err.message
    assert err.hint == f"check that {host} is up and reachable: ping {host}"
    assert attempts == ["mute"] and err.details["attempts"] == 1


async def test_rejected_key_is_an_authentication_failure(
    sshd_nodes: list[SshdNode], ssh_inventory: Inventory, tmp_path: Path, attempts: list[str]
) -> None:
    stranger = tmp_path / "stranger_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    stranger.chmod(0o600)
    sshd = sshd_nodes[0]
    transport = SshTransport(ssh_node("n2", sshd.host, sshd.port, stranger, tmp_path), backoff=(5.0,))
    err = await expect_error(transport, ErrorCode.CONNECTION_FAILED)
    assert err.message.startswith(
        f"SSH authentication failed for root@127.0.0.2:{sshd.port} with key {stranger}"
    )
    assert attempts == ["n2"], "a refused login is not retried"


async def test_missing_key_file_is_reported_before_connecting(
    ssh_inventory: Inventory, tmp_path: Path
) -> None:
    sshd_node = ssh_inventory.node("n2")
    assert sshd_node.ssh is not None
    node = ssh_node("n2", sshd_node.ssh.host, sshd_node.ssh.port, tmp_path / "no_such_key", tmp_path)
    err = await expect_error(SshTransport(node), ErrorCode.CONNECTION_FAILED)
    assert err.message == f"SSH key for node n2 not found: {tmp_path / 'no_such_key'}"


async def test_channel_cap_queues_commands_beyond_eight(ssh_inventory: Inventory, tmp_path: Path) -> None:
    running = tmp_path / "running"  # one file per command in flight: the node shares this disk
    running.mkdir()
    script = 'touch "$1/$2"; sleep 0.3; ls "$1" | wc -l; rm "$1/$2"'
    async with SshTransport(ssh_inventory.node("n2")) as transport:
        results = await asyncio.gather(
            *(transport.run(["sh", "-c", script, "sh", str(running), str(i)]) for i in range(12))
        )
    assert all(r.ok for r in results), [r.stderr for r in results]
    in_flight = [int(r.stdout) for r in results]
    assert max(in_flight) <= 8, f"12 commands with 8 channels run at most 8 at once: {in_flight}"
    assert not list(running.iterdir())


async def test_reconnects_after_the_node_comes_back(
    sshd_factory: SshdFactory, rbee_config_dir: Path, tmp_path: Path
) -> None:
    sshd = sshd_factory.start("127.0.0.5")
    try:
        known_hosts = KnownHosts()
        known_hosts.trust(sshd.host, sshd.port, sshd.host_key)
        async with SshTransport(node_for(sshd, tmp_path, "flaky"), backoff=(0.05,)) as transport:
            assert (await transport.run(["echo", "1"])).ok
            sshd.stop()
            with pytest.raises(RbeeError) as info:
                await transport.run(["echo", "2"])
            assert info.value.code == ErrorCode.CONNECTION_FAILED
            sshd.start()
            assert (await transport.run(["echo", "3"])).stdout == "3\n"
    finally:
        sshd.stop()


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_bad_connect_timeout_setting_is_refused_by_name(
    value: str, ssh_inventory: Inventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_SSH_CONNECT_TIMEOUT", value)
    with pytest.raises(RbeeError) as info:
        SshTransport(ssh_inventory.node("n2"))
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert (
        info.value.message == f"RBEE_SSH_CONNECT_TIMEOUT must be a positive number of seconds, not {value!r}"
    )


async def test_connect_timeout_setting_applies_to_every_ssh_node(
    silent_listener: tuple[str, int],
    known_hosts: KnownHosts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, port = silent_listener
    known_hosts.trust(host, port, asyncssh.generate_private_key("ssh-ed25519").convert_to_public())
    monkeypatch.setenv("RBEE_SSH_CONNECT_TIMEOUT", "0.25")
    transport = SshTransport(ssh_node("mute", host, port, None, tmp_path), known_hosts=known_hosts)
    err = await expect_error(transport, ErrorCode.CONNECTION_TIMEOUT)
    assert err.message.endswith("timed out (0.25s per attempt)"), err.message
