"""`rbee-keeper status | hive | models` over a local node and two real sshd nodes."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import asyncssh
import pytest

from tests import sshd

from ..waiting import wait_for
from .conftest import Fleet, make_keeper


def test_status_across_nodes_one_hive_running(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    keeper = fleet.keeper
    started = keeper.run("hive", "start", "--node", "n2")
    assert started.rc == 0, started
    assert re.search(r"^n2: started \(pid \d+\)$", started.err, re.M), started
    again = keeper.run("hive", "start", "--node", "n2")
    assert again.rc == 0 and "n2: already running" in again.err, again

    run = keeper.run("status", json_mode=True)
    assert run.rc == 0, run
    status = run.json()
    assert list(status) == ["local", "n2", "n3"]
    assert status["n2"]["running"] is True and status["n2"]["pid"]
    assert status["local"]["running"] is False and status["n3"]["running"] is False
    for name in status:
        assert status[name]["home"] == str(fleet.homes / name)
        assert status[name]["node"]["ram_total"] > 0

    human = keeper.run("status")
    assert human.rc == 0, human
    rows = {line.split("│")[1].strip(): line for line in human.out.splitlines() if line.count("│") > 3}
    assert "running" in rows["n2"] and "stopped" in rows["local"] and "stopped" in rows["n3"]

    # fan-out is concurrent: three nodes cost about one node's time (printed, not asserted: CI is noisy;
    # test_a_hung_node_costs_one_connect_timeout_and_hung_nodes_wait_together checks the overlap)
    one = keeper.run("status", "--node", "n2")
    assert one.rc == 0, one
    three = min(human.seconds, run.seconds)
    with capsys.disabled():
        print(f"\n[keeper] status wall time: 1 node {one.seconds:.2f}s, 3 nodes {three:.2f}s")


def test_status_with_a_node_down(fleet: Fleet) -> None:
    keeper, n3 = fleet.keeper, fleet.nodes["n3"]
    healthy = keeper.run("status")
    assert healthy.rc == 0, healthy
    n3.stop()
    try:
        run = keeper.run("status")
        down_json = keeper.run("status", json_mode=True)
    finally:
        n3.start()
    assert run.rc == 1, run
    rows = {line.split("│")[1].strip(): line for line in run.out.splitlines() if line.count("│") > 3}
    assert set(rows) == {"local", "n2", "n3"}, run.out
    assert "unreachable" in rows["n3"] and "CONNECTION_FAILED" in rows["n3"]
    assert "running" in rows["n2"] and "stopped" in rows["local"]
    assert "n3: cannot connect" in run.err, "the cause goes to stderr"

    status = down_json.json()
    assert down_json.rc == 1
    # a refused port: its quick retries, never a connect timeout
    assert status["n3"]["error"]["code"] == "CONNECTION_FAILED"
    assert status["n3"]["error"]["details"]["attempts"] == 3
    assert status["n3"]["error"]["details"]["host"] == n3.host
    assert status["n2"]["running"] is True and status["local"]["running"] is False

    back = keeper.run("status", "--node", "n3", json_mode=True)
    assert back.rc == 0 and back.json()["n3"]["running"] is False


def _hive_pid(fleet: Fleet, node: str) -> int:
    return int((fleet.homes / node / "hive.pid").read_text().split()[0])


def test_a_running_hive_answers_over_streamlocal_without_a_process(fleet: Fleet) -> None:
    """status, models list and worker list read n2's daemon over its socket: no `rbee-hive` runs."""
    keeper, venv = fleet.keeper, fleet.homes / "n2" / "venv"
    assert keeper.run("hive", "start", "--node", "n2").rc == 0
    hidden = venv.with_name("venv.away")
    venv.rename(hidden)  # `rbee-hive` can no longer be started on n2
    try:
        status = keeper.run("status", json_mode=True)
        listings = keeper.run("models", "list", "--node", "n2", json_mode=True)
    finally:
        hidden.rename(venv)
    assert status.rc == 0, status
    info = status.json()
    assert info["n2"]["running"] is True and info["n2"]["via"] == "socket"
    assert info["n2"]["home"] == str(fleet.homes / "n2") and info["n2"]["node"]["ram_total"] > 0
    assert info["n2"]["pid"] == _hive_pid(fleet, "n2")
    # no daemon on these: the command path, saying what it always said
    assert info["n3"]["via"] == "command" and info["n3"]["running"] is False
    assert info["local"]["via"] == "command" and info["local"]["running"] is False
    assert listings.rc == 0 and listings.json() == {"n2": []}, listings


def test_a_stopped_node_and_a_silent_hive_do_not_hold_the_table(fleet: Fleet) -> None:
    keeper, n3 = fleet.keeper, fleet.nodes["n3"]
    assert keeper.run("hive", "start", "--node", "n2").rc == 0
    pid = _hive_pid(fleet, "n2")
    n3.stop()
    os.kill(pid, signal.SIGSTOP)  # n2's daemon accepts nothing: its socket stays silent
    try:
        run = keeper.run("status", "--timeout", "1", json_mode=True)
        human = keeper.run("status", "--timeout", "1")
    finally:
        os.kill(pid, signal.SIGCONT)
        n3.start()
    assert run.rc == 1, run
    status = run.json()
    assert status["n2"]["error"]["code"] == "REQUEST_TIMEOUT", run
    assert "n2" in status["n2"]["error"]["message"] and "1s" in status["n2"]["error"]["message"]
    assert status["n3"]["error"]["code"] == "CONNECTION_FAILED"
    assert status["local"]["running"] is False
    rows = {line.split("│")[1].strip(): line for line in human.out.splitlines() if line.count("│") > 3}
    assert "no answer in 1s" in rows["n2"] and "unreachable" in rows["n3"], human.out
    assert "stopped" in rows["local"], human.out

    bad = keeper.run("status", "--timeout", "0")
    assert bad.rc == 2 and "--timeout" in bad.err, bad


def test_models_add_pushes_over_sftp_then_is_cached(fleet: Fleet, tiny_model: Path) -> None:
    keeper = fleet.keeper
    first = keeper.run("models", "add", f"file:{tiny_model}", "--node", "n2")
    assert first.rc == 0, first
    assert f"n2: push {tiny_model.name}" in first.err
    assert "n2: tiny ready" in first.out
    pushed = fleet.homes / "n2" / "models" / "tiny.gguf"  # pushed to incoming/, then moved into the catalog
    assert pushed.exists() and pushed.stat().st_size == tiny_model.stat().st_size
    assert list((fleet.homes / "n2" / "incoming").iterdir()) == []

    everywhere = keeper.run("models", "list", json_mode=True)
    assert everywhere.rc == 0, everywhere
    (entry,) = everywhere.json()["n2"]
    assert entry["name"] == "tiny" and entry["size"] == tiny_model.stat().st_size
    assert entry["architecture"] == "llama"
    assert everywhere.json()["local"] == [] and everywhere.json()["n3"] == []

    again = keeper.run("models", "add", f"file:{tiny_model}", "--node", "n2")
    assert again.rc == 0 and "n2: tiny ready" in again.out, again
    assert "push" not in again.err, "a cached model is not transferred again"

    table = keeper.run("models", "list")
    assert table.rc == 0 and any(
        "n2" in line and "tiny" in line and "llama" in line for line in table.out.splitlines()
    )


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_models_add_progress_as_seen_in_a_terminal(fleet: Fleet, tiny_model: Path, tmp_path: Path) -> None:
    """Rich draws the push/import/verify bars on a real tty; check the screen, not just the exit code."""
    keeper = fleet.keeper
    socket = f"rbee-keeper-test-{os.getpid()}"
    env = " ".join(
        f"{k}={shlex.quote(v)}" for k, v in keeper.env.items() if k.startswith(("RBEE_", "XDG_", "PATH"))
    )
    done = tmp_path / "exit-code"
    argv = keeper.argv("models", "add", f"file:{tiny_model}", "--node", "n3")
    command = f"env -u COLUMNS {env} {shlex.join(argv)}; echo $? > {shlex.quote(str(done))}; sleep 60"
    tmux = ["tmux", "-L", socket, "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "-x", "120", "-y", "20", command], check=True, timeout=10)
    try:
        wait_for(done.exists, timeout=40, what="the keeper to finish inside tmux")
        screen = subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "0"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], timeout=10, check=False)
    assert done.read_text().strip() == "0", screen
    lines = screen.splitlines()
    push = next((line for line in lines if f"n3: push {tiny_model.name}" in line), None)
    assert push is not None, screen
    assert "━" in push and "kB" in push, f"a filled bar with byte counts: {push!r}"
    size_kb = f"{tiny_model.stat().st_size / 1000:.1f}/{tiny_model.stat().st_size / 1000:.1f} kB"
    assert size_kb in push, push
    assert any("n3: verify" in line for line in lines), screen
    assert any(line.startswith("n3: tiny ready") for line in lines), screen


def test_shell_metacharacters_in_model_names_are_never_run(fleet: Fleet, tmp_path: Path) -> None:
    keeper = fleet.keeper
    marker = tmp_path / f"rbee-pwned-{os.getpid()}"
    evil = [
        f"x; touch {marker}",
        f"$(touch {marker})",
        f"x' ; touch {marker}; '",
    ]
    runs = [keeper.run("infer", "--node", "n2", "--model", name, "--prompt", "hi") for name in evil]
    # other commands that put a model name into a node command, on the other node
    runs.append(keeper.run("models", "rm", f"`touch {marker}`", "--node", "n3"))
    runs.append(keeper.run("worker", "spawn", "--node", "n3", "--model", f"x\ntouch {marker}"))
    for run in runs:
        assert run.rc == 1, run
        assert "Traceback" not in run.err, run
        assert "error [" in run.err, run
    for name, run in zip(evil, runs, strict=False):
        assert "MODEL_NOT_FOUND" in run.err, run
        # a suggested command must be safe to paste: the name stays one quoted word
        hint = next(line for line in run.err.splitlines() if line.strip().startswith("try:"))
        words = shlex.split(hint.split("try:", 1)[1])
        assert words[words.index("--name") + 1] == name, hint
    assert not marker.exists(), "a model name was executed by a shell"
    evil_add = keeper.run("models", "add", f"file:$(touch {marker})", "--node", "n2")
    assert evil_add.rc == 1 and "MODEL_NOT_FOUND" in evil_add.err
    assert not marker.exists()


def test_node_without_rbee_or_with_another_version(
    keeper_sshd_nodes: list[sshd.SshdNode], tmp_path: Path
) -> None:
    """EC8 and a bare node: the keeper names the problem and the command that fixes it."""
    node = keeper_sshd_nodes[0]
    bare, old = tmp_path / "homes" / "bare", tmp_path / "homes" / "old"
    bare.mkdir(parents=True)
    (old / "venv" / "bin").mkdir(parents=True)
    fake = old / "venv" / "bin" / "rbee-hive"  # a real program on the node that is another rbee release
    fake.write_text('#!/bin/sh\necho \'{"event":"result","status":"running","pid":1,"version":"9.9.9"}\'\n')
    fake.chmod(0o755)
    keeper = make_keeper(tmp_path, sshd.write_inventory(tmp_path / "inventory.yaml", {}, tmp_path / "homes"))
    sshd.trust_nodes(keeper.config_dir, [node])
    ssh = f"{{host: {node.host}, port: {node.port}, user: {node.user}, key: '{node.client_key}'}}"
    with keeper.inventory.open("a") as fh:
        for name, home in (("bare", bare), ("old", old)):
            fh.write(f"  {name}:\n    ssh: {ssh}\n    home: '{home}'\n")

    missing = keeper.run("infer", "--node", "bare", "--model", "tiny", "--prompt", "hi")
    assert missing.rc == 1, missing
    assert "rbee is not installed on node bare" in missing.err
    assert "try: rbee-keeper setup install --node bare" in missing.err

    mismatch = keeper.run("infer", "--node", "old", "--model", "tiny", "--prompt", "hi")
    assert mismatch.rc == 1, mismatch
    assert "VERSION_MISMATCH" in mismatch.err and "9.9.9" in mismatch.err
    assert "try: rbee-keeper setup install --node old" in mismatch.err


class BlackHole:
    """A port that accepts TCP and never sends an SSH banner; notes which others were open at each accept."""

    def __init__(self, host: str, holes: list[BlackHole]) -> None:
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.open_at_accept: list[int] = []  # for each accept: how many other holes held an open client
        self._holes = holes
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = self.listener.accept()[0]
                self.open_at_accept.append(sum(h.has_open_client() for h in self._holes if h is not self))
                self.accepted.append(conn)

    def has_open_client(self) -> bool:
        for conn in list(self.accepted):
            conn.setblocking(False)
            try:
                while conn.recv(4096):  # the client's banner; EOF once it gave up
                    pass
            except BlockingIOError:
                return True
            except OSError:
                pass
        return False

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def test_a_hung_node_costs_one_connect_timeout_and_hung_nodes_wait_together(tmp_path: Path) -> None:
    """EC1 with black holes: one connect attempt per hung node, all of them at the same time."""
    holes: list[BlackHole] = []
    holes += [BlackHole("127.0.0.4", holes) for _ in range(2)]
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "nodes:\n"
        + "".join(
            f"  hung{i}:\n    ssh: {{host: 127.0.0.4, port: {h.port}, user: me}}\n"
            for i, h in enumerate(holes)
        )
    )
    keeper = make_keeper(tmp_path, inventory, RBEE_SSH_CONNECT_TIMEOUT="1.5")
    pinned = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    (keeper.config_dir / "known_hosts").write_text("".join(f"[127.0.0.4]:{h.port} {pinned}\n" for h in holes))
    try:
        run = keeper.run("status", json_mode=True)
    finally:
        for hole in holes:
            hole.close()
    assert run.rc == 1, run
    for name in ("hung0", "hung1"):
        error = run.json()[name]["error"]
        assert error["code"] == "CONNECTION_TIMEOUT", error
        assert error["details"]["attempts"] == 1 and "(1.5s per attempt)" in error["details"]["reason"], error
    assert [len(h.accepted) for h in holes] == [1, 1], "a timeout is not retried"
    # fan-out: whichever hole was reached second saw the first one's client still waiting
    assert sorted(h.open_at_accept[0] for h in holes) == [0, 1], [h.open_at_accept for h in holes]
