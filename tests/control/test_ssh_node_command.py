"""argv for rbee programs on a node, and that it resolves on a real node's home."""

from __future__ import annotations

import sys
from pathlib import Path

from rbee_control.inventory.loader import load_inventory
from rbee_control.inventory.model import Node, SshSettings
from rbee_control.ssh.command import NodePath, remote_command_line
from rbee_control.ssh.node_command import hive_command, node_command, node_env, venv_bin
from rbee_control.ssh.pool import TransportPool
from tests.sshd import SshdNode, trust_nodes, write_inventory

MAC = Node(name="mac", transport="ssh", address="mac", ssh=SshSettings(host="mac"))


def test_hive_argv_for_an_ssh_node() -> None:
    argv = hive_command(MAC, "status", "--json")
    assert argv == [
        "~/.local/share/rbee/venv/bin/rbee-hive",
        "--home",
        "~/.local/share/rbee",
        "status",
        "--json",
    ]
    assert all(isinstance(a, NodePath) for a in argv[:3:2])
    line = remote_command_line(argv, node_env(MAC))
    home = '"$HOME"/.local/share/rbee'
    assert line.endswith(f" rbee env RBEE_HOME={home} {home}/venv/bin/rbee-hive --home {home} status --json")
    assert node_command(MAC, "worker", "--port", "8081")[0] == "~/.local/share/rbee/venv/bin/rbee-worker"


def test_local_node_without_a_venv_uses_the_keepers_own_programs(tmp_path: Path) -> None:
    local = Node(name="local", transport="local", address="127.0.0.1", home=str(tmp_path / "home"))
    argv = hive_command(local, "status")
    assert argv[0] == str(Path(sys.executable).parent / "rbee-hive")
    assert argv[1:] == ["--home", str(tmp_path / "home"), "status"]


async def test_venv_programs_resolve_on_ssh_and_local_nodes(
    sshd_nodes: list[SshdNode], rbee_config_dir: Path, tmp_path: Path
) -> None:
    nodes = {"n2": sshd_nodes[0]}
    trust_nodes(rbee_config_dir, nodes.values())
    path = write_inventory(tmp_path / "inventory.yaml", nodes, tmp_path / "homes", venv=Path(sys.prefix))
    inventory = load_inventory(path)
    script = "import os, rbee_control; print(os.environ['RBEE_HOME'])"

    async def where(transport) -> str:
        node = transport.node
        result = await transport.run([venv_bin(node, "python"), "-c", script], env=node_env(node))
        assert result.ok, result.stderr
        return result.stdout.strip()

    async with TransportPool(inventory) as pool:
        outcomes = await pool.fan_out(["local", "n2"], where)
    assert {name: o.value for name, o in outcomes.items()} == {
        "local": str(tmp_path / "homes" / "local"),
        "n2": str(tmp_path / "homes" / "n2"),
    }
