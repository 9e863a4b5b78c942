"""Fixtures for the control plane: real sshd nodes on 127.0.0.2/.3 and inventories pointing at them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import asyncssh
import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from rbee_control.inventory.loader import load_inventory  # noqa: E402
from rbee_control.inventory.model import Inventory, Node  # noqa: E402
from rbee_control.ssh import connect  # noqa: E402
from rbee_control.ssh.known_hosts import KnownHosts  # noqa: E402
from tests import sshd  # noqa: E402

# Shared fixtures from tests/sshd.py (binding them here registers them for this directory).
sshd_factory = sshd.sshd_factory
sshd_nodes = sshd.sshd_nodes
rbee_config_dir = sshd.rbee_config_dir
ssh_inventory_path = sshd.ssh_inventory_path


@pytest.fixture
def known_hosts(rbee_config_dir: Path) -> KnownHosts:
    return KnownHosts(rbee_config_dir / "known_hosts")


@pytest.fixture
def ssh_inventory(ssh_inventory_path: Path) -> Inventory:
    return load_inventory(ssh_inventory_path)


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The node names of every real connect attempt (counted, not timed: CI machines are noisy)."""
    made: list[str] = []
    real = connect._connect_once

    async def counted(node: Node, *args: Any) -> asyncssh.SSHClientConnection:
        made.append(node.name)
        return await real(node, *args)

    monkeypatch.setattr(connect, "_connect_once", counted)
    return made
