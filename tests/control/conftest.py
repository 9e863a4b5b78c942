"""Fixtures for the control plane: real sshd nodes on 127.0.0.2/.3 and inventories pointing at them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from rbee_control.inventory.loader import load_inventory  # noqa: E402
from rbee_control.inventory.model import Inventory  # noqa: E402
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
