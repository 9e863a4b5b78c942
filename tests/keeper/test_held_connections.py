"""The keeper's connection holder: SSH connections kept between runs, with the same checks as a direct one.

Real sshd nodes and hives; the holder is the real `held_daemon` process the keeper
starts. Which connection served a run is read from sshd itself: every SSH
connection is one child process of the node's listening sshd.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import psutil
import pytest

from rbee_control import __version__
from rbee_control.ssh.held_paths import holder_pid, stop_holder
from tests import sshd

from ..waiting import wait_for
from .conftest import Fleet, Keeper


@pytest.fixture
def hold_dir() -> Iterator[Path]:
    """A short private directory (a Unix socket path must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="rbee-held-"))
    try:
        yield path
    finally:
        assert stop_holder(path), "the holder did not exit on SIGTERM"
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def _holding(fleet: Fleet, hold_dir: Path, persist: str = "60") -> Keeper:
    extra = {**fleet.keeper.env_extra, "RBEE_SSH_PERSIST": persist, "RBEE_SSH_PERSIST_DIR": str(hold_dir)}
    return dataclasses.replace(fleet.keeper, env_extra=extra)


def _connections(node: sshd.SshdNode) -> set[int]:
    """The pids of the sshd processes serving one connection each on `node`."""
    assert node.process is not None
    return {child.pid for child in psutil.Process(node.process.pid).children()}


def _status(keeper: Keeper, *args: str) -> dict[str, dict[str, object]]:
    run = keeper.run("status", *args, json_mode=True)
    assert run.rc == 0, run
    result: dict[str, dict[str, object]] = run.json()
    return result


def test_a_second_status_reuses_the_held_connection(fleet: Fleet, hold_dir: Path) -> None:
    assert fleet.keeper.run("hive", "start", "--node", "n2").rc == 0
    n2 = fleet.nodes["n2"]
    keeper = _holding(fleet, hold_dir)
    before = _connections(n2)

    first = _status(keeper, "--node", "n2")
    assert first["n2"]["running"] is True and first["n2"]["via"] == "socket"
    held = _connections(n2) - before
    assert len(held) == 1, "the holder opened one connection to n2 and kept it"
    pid = holder_pid(hold_dir)
    assert pid is not None
    socket_path = hold_dir / f"keeper-{__version__}.sock"
    assert (socket_path.stat().st_mode & 0o777) == 0o600 and (hold_dir.stat().st_mode & 0o777) == 0o700

    second = _status(keeper, "--node", "n2")
    assert second["n2"]["running"] is True and second["n2"]["via"] == "socket"
    assert _connections(n2) - before == held, "no new SSH connection: the held one answered"
    assert holder_pid(hold_dir) == pid

    assert stop_holder(hold_dir)
    wait_for(lambda: not (_connections(n2) & held), timeout=15, what="the held connection to close")
    assert not socket_path.exists()


def test_a_node_that_went_down_is_reported_then_reconnected(fleet: Fleet, hold_dir: Path) -> None:
    assert fleet.keeper.run("hive", "start", "--node", "n2").rc == 0
    keeper, n2 = _holding(fleet, hold_dir), fleet.nodes["n2"]
    assert _status(keeper, "--node", "n2")["n2"]["via"] == "socket"
    n2.stop()  # the held connection dies with it
    try:
        down = keeper.run("status", "--node", "n2", json_mode=True)
        told = keeper.run("status", "--node", "n2")
        direct = fleet.keeper.run("status", "--node", "n2")
    finally:
        n2.start()
    assert down.rc == 1, down
    error = down.json()["n2"]["error"]
    assert error["code"] == "CONNECTION_FAILED" and error["details"]["attempts"] == 3, down
    assert told.rc == 1 and "n2: cannot connect" in told.err, told
    assert told.err == direct.err, "the cause and hint read as a direct run's"
    back = _status(keeper, "--node", "n2")
    assert back["n2"]["running"] is True and back["n2"]["via"] == "socket"


def test_a_changed_pin_is_checked_even_with_a_connection_held(fleet: Fleet, hold_dir: Path) -> None:
    assert fleet.keeper.run("hive", "start", "--node", "n2").rc == 0
    keeper, n2 = _holding(fleet, hold_dir), fleet.nodes["n2"]
    assert _status(keeper, "--node", "n2")["n2"]["via"] == "socket"
    known_hosts = keeper.config_dir / "known_hosts"
    pinned = known_hosts.read_text()
    stranger = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    name = f"[{n2.host}]:{n2.port}"
    lines = [f"{name} {stranger}" if line.startswith(f"{name} ") else line for line in pinned.splitlines()]
    known_hosts.write_text("\n".join(lines) + "\n")
    try:
        run = keeper.run("status", "--node", "n2", json_mode=True)
    finally:
        known_hosts.write_text(pinned)
    assert run.rc == 1, run
    assert run.json()["n2"]["error"]["code"] == "HOST_KEY_CHANGED", run
    assert _status(keeper, "--node", "n2")["n2"]["via"] == "socket"


def test_an_unsafe_directory_is_not_used(fleet: Fleet, hold_dir: Path) -> None:
    hold_dir.chmod(0o755)
    keeper = _holding(fleet, hold_dir)
    status = _status(keeper, "--node", "n2")
    assert status["n2"]["running"] in (True, False)
    assert holder_pid(hold_dir) is None and not list(hold_dir.iterdir()), "nothing started or written there"


def test_the_holder_exits_when_idle(fleet: Fleet, hold_dir: Path) -> None:
    assert fleet.keeper.run("hive", "start", "--node", "n2").rc == 0
    keeper, n2 = _holding(fleet, hold_dir, persist="1"), fleet.nodes["n2"]
    before = _connections(n2)
    assert _status(keeper, "--node", "n2")["n2"]["via"] == "socket"
    assert holder_pid(hold_dir) is not None or not (_connections(n2) - before)
    wait_for(lambda: holder_pid(hold_dir) is None, timeout=20, what="an idle holder to exit")
    wait_for(lambda: not (_connections(n2) - before), timeout=15, what="its connection to close")
    log = (hold_dir / "holder.log").read_text()
    assert "holding n2" in log and "exiting" in log, log
