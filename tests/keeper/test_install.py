"""`rbee-keeper setup install` on a real sshd node whose home has no rbee at all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import sshd

from .conftest import HIVE_ENV, Keeper, make_keeper, stop_fleet


@pytest.mark.slow
def test_install_builds_pushes_and_runs_from_the_node_venv(
    keeper_sshd_nodes: list[sshd.SshdNode], tmp_path: Path
) -> None:
    node = keeper_sshd_nodes[0]
    home = tmp_path / "homes" / "fresh"
    inventory = sshd.write_inventory(
        tmp_path / "inventory.yaml", {"fresh": node}, tmp_path / "homes", local_node=None
    )
    keeper: Keeper = make_keeper(tmp_path, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    assert not (home / "venv").exists()

    before = keeper.run("hive", "status", "--node", "fresh")
    assert before.rc == 1 and "setup install --node fresh" in before.err, before

    first = keeper.run("setup", "install", "--node", "fresh", timeout=900)
    assert first.rc == 0, first
    assert "fresh: rbee-hive" in first.err, first
    venv_python = home / "venv" / "bin" / "python"
    assert venv_python.exists() and venv_python.resolve() != Path(sys.executable).resolve()
    assert (home / "venv" / "bin" / "rbee-worker").exists()

    again = keeper.run("setup", "install", "--node", "fresh", timeout=900)
    assert again.rc == 0, again  # idempotent: same venv, same version

    status = keeper.run("hive", "start", "--node", "fresh")
    assert status.rc == 0, status
    stop_fleet(keeper, tmp_path / "homes")


@pytest.mark.slow
def test_install_into_a_home_given_with_tilde(sshd_factory: sshd.SshdFactory, tmp_path: Path) -> None:
    """`home: ~/rbee` means the node user's home: the venv must not land in `$HOME/~/rbee`."""
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    node = sshd_factory.start("127.0.0.5").set_env({"HOME": str(user_home), **HIVE_ENV})
    inventory = tmp_path / "inventory.yaml"
    ssh = f"host: {node.host}, port: {node.port}, user: {node.user}, key: '{node.client_key}'"
    inventory.write_text(f"nodes:\n  tilde:\n    ssh: {{{ssh}}}\n    home: ~/rbee\n")
    keeper = make_keeper(tmp_path, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    try:
        run = keeper.run("setup", "install", "--node", "tilde", timeout=900)
        assert run.rc == 0, run
        assert (user_home / "rbee" / "venv" / "bin" / "rbee-hive").exists()
        assert not (user_home / "~").exists(), "the ~ was quoted and created literally"
        started = keeper.run("hive", "start", "--node", "tilde")
        assert started.rc == 0, started
        assert (user_home / "rbee" / "hive.pid").exists()
        stop_fleet(keeper, user_home)
    finally:
        node.stop()
