"""TransportPool: one lazily opened transport per node, concurrent fan-out, down nodes reported."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from rbee_control.inventory.model import Inventory, SshSettings
from rbee_control.ssh.pool import TransportPool
from rbee_control.ssh.transport import NodeTransport
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from tests.sshd import free_port


def with_down_node(inventory: Inventory) -> Inventory:
    """The inventory plus `down`: n2's settings pointed at a port nobody listens on."""
    n2 = inventory.node("n2")
    assert n2.ssh is not None
    down_ssh = SshSettings(host="127.0.0.4", port=free_port("127.0.0.4"), user=n2.ssh.user, key=n2.ssh.key)
    down = replace(n2, name="down", address="127.0.0.4", ssh=down_ssh)
    return Inventory(
        nodes={**inventory.nodes, "down": down}, defaults=inventory.defaults, path=inventory.path
    )


async def server_address(transport: NodeTransport) -> str:
    if transport.node.is_local:
        return "local"
    result = await transport.run(["sh", "-c", 'echo "$SSH_CONNECTION"'])
    return result.stdout.split()[2]


async def test_fan_out_reports_a_down_node_and_serves_the_others(
    ssh_inventory: Inventory, attempts: list[str]
) -> None:
    inventory = with_down_node(ssh_inventory)
    async with TransportPool(inventory) as pool:
        outcomes = await pool.fan_out(["n2", "down", "n3", "local"], server_address)
        assert list(outcomes) == ["n2", "down", "n3", "local"]
        assert outcomes["n2"].value == "127.0.0.2" and outcomes["n3"].value == "127.0.0.3"
        assert outcomes["local"].value == "local"
        down = outcomes["down"]
        assert not down.ok and down.error is not None
        assert down.error.code == ErrorCode.CONNECTION_FAILED
        assert "connection refused" in down.error.message
        # a refused port costs its three quick attempts, the reachable nodes one connect each
        assert sorted(attempts) == ["down", "down", "down", "n2", "n3"]

        with pytest.raises(RbeeError) as info:
            await pool.get("down")
        assert info.value is down.error, "a failed connect is remembered for the run"
        assert len(attempts) == 5, "and not tried again"


async def test_one_connection_per_node_shared_by_concurrent_callers(ssh_inventory: Inventory) -> None:
    async with TransportPool(ssh_inventory) as pool:
        transports = await asyncio.gather(*(pool.get("n2") for _ in range(5)))
        assert all(t is transports[0] for t in transports)
        assert await pool.get(ssh_inventory.node("n2")) is transports[0]
        results = await asyncio.gather(*(t.run(["echo", "x"]) for t in transports))
        assert all(r.stdout == "x\n" for r in results)
    with pytest.raises(RbeeError, match="closed"):
        await transports[0].run(["true"])


async def test_fan_out_timeout_and_unexpected_errors_become_outcomes(ssh_inventory: Inventory) -> None:
    async def slow_or_broken(transport: NodeTransport) -> str:
        if transport.node.name == "n2":
            await transport.run(["sleep", "5"])
        if transport.node.name == "n3":
            raise ValueError("bad data from node")
        return "fine"

    async with TransportPool(ssh_inventory) as pool:
        outcomes = await pool.fan_out(ssh_inventory.names(), slow_or_broken, timeout=0.5)
    assert outcomes["local"].value == "fine"
    assert outcomes["n2"].error is not None and outcomes["n2"].error.code == ErrorCode.REQUEST_TIMEOUT
    assert outcomes["n3"].error is not None and outcomes["n3"].error.code == ErrorCode.INTERNAL_ERROR
    assert "bad data from node" in outcomes["n3"].error.message


async def test_unknown_node_names_fail_before_anything_runs(ssh_inventory: Inventory, tmp_path: Path) -> None:
    async with TransportPool(ssh_inventory) as pool:
        with pytest.raises(RbeeError) as info:
            await pool.fan_out(["n2", "n4"], server_address)
    assert info.value.code == ErrorCode.UNKNOWN_NODE
    assert "did you mean" in info.value.message
