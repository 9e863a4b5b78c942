"""The hive daemon's own lifecycle: idempotent start, a private socket, a clean stop."""

from __future__ import annotations

import os
import stat
import subprocess

import psutil

from rbee_control.hive.client import HiveClient
from rbee_control.hive.paths import HivePaths
from rbee_worker.protocol.node_events import parse_line

from ..waiting import wait_for as wait_until
from .conftest import HIVE, Hive, gone


async def test_start_is_idempotent_private_and_stops_clean(hive: Hive) -> None:
    assert hive.run("status").result["running"] is False
    first = hive.start()
    assert first["status"] == "started"
    pid = first["pid"]
    again = hive.start()
    assert again["status"] == "already_running" and again["pid"] == pid
    foreground = hive.run("daemon")  # not detached: finds the running one and returns, serving nothing
    assert foreground.result["status"] == "already_running" and foreground.result["pid"] == pid
    assert int((hive.home / "hive.pid").read_text()) == pid
    hives = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(hive.home) in " ".join(p.info["cmdline"] or []) and "daemon" in (p.info["cmdline"] or [])
    ]
    assert hives == [pid], f"one hive per home, not {hives}"

    sock = hive.home / "hive.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert psutil.Process(pid).net_connections(kind="inet") == [], (
        "the hive listens on nothing but its socket"
    )
    async with HiveClient(HivePaths(hive.home)) as client:
        health = (await client.health()).to_json()
    assert health["status"] == "alive" and health["api_version"] == "v1" and health["pid"] == pid
    status = hive.run("status").result
    assert status["running"] and status["workers"] == [] and status["node"]["ram_total"] > 0

    stopped = hive.stop()
    assert stopped["stopped"] and stopped["how"] == "graceful"
    assert gone(pid) and not sock.exists() and not (hive.home / "hive.pid").exists()
    assert "hive stopped" in hive.log()
    assert hive.stop()["stopped"] is False


def test_stale_pid_file_is_cleaned(hive: Hive) -> None:
    hive.home.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (hive.home / "hive.pid").write_text(f"{dead.pid}\n")
    (hive.home / "hive.sock").touch()
    started = hive.start()
    assert started["status"] == "started" and started["pid"] != dead.pid
    assert int((hive.home / "hive.pid").read_text()) == started["pid"]
    # a live pid that is not a hive (this test process) is stale too
    hive.stop()
    (hive.home / "hive.pid").write_text(f"{os.getpid()}\n")
    assert hive.start()["status"] == "started"


def test_sigterm_and_concurrent_starts(hive: Hive) -> None:
    """Two starts racing end with one daemon; SIGTERM stops it like `stop` does."""
    procs = [
        subprocess.Popen(
            [*HIVE, "daemon", "--detach", "--home", str(hive.home), "--json"],
            env=hive.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=30)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    pids = {parse_line(out.splitlines()[-1]).data["pid"] for out in outs}
    assert len(pids) == 1
    pid = pids.pop()
    os.kill(pid, 15)
    wait_until(lambda: gone(pid), 10, "the daemon to exit on SIGTERM")
    assert not (hive.home / "hive.sock").exists() and not (hive.home / "hive.pid").exists()
