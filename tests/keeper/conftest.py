"""Fixtures for `rbee-keeper` end to end: the real CLI as a subprocess, real sshd nodes, real hives.

Every keeper run is `python -m rbee_control.keeper.cli --inventory <test inventory> …` with
its own `RBEE_CONFIG_DIR` (known_hosts, known_workers.json) and `XDG_STATE_HOME` (partial
answers), so nothing touches the operator's own files. Hives of these tests put their
workers on ports 8800–8899 (other suites use 8700–8799): the sshd nodes pass
`RBEE_HIVE_PORT_MIN/MAX` to every command through `SetEnv`, the local node inherits them
from the keeper's environment. A module's fleet stops its hives at the end and checks
that no hive or worker process of its homes is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from tests import sshd  # noqa: E402

# Shared fixtures from tests/sshd.py (binding them here registers them for this directory).
sshd_factory = sshd.sshd_factory

PORT_MIN, PORT_MAX = 8800, 8899
HIVE_ENV = {"RBEE_HIVE_PORT_MIN": str(PORT_MIN), "RBEE_HIVE_PORT_MAX": str(PORT_MAX)}
#: Bound on any single keeper run in these tests (a cold infer takes ~5 s here).
RUN_TIMEOUT = 60.0


@dataclass
class Run:
    """One finished keeper run: what the operator saw and how long it took."""

    argv: list[str]
    rc: int
    out: str
    err: str
    seconds: float

    def json(self) -> Any:
        lines = [line for line in self.out.splitlines() if line.strip()]
        assert lines, f"no JSON on stdout\nstderr:\n{self.err}"
        return json.loads(lines[-1])

    def __str__(self) -> str:
        head = f"$ {' '.join(self.argv)}\nexit {self.rc} in {self.seconds:.2f}s"
        return f"{head}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


@dataclass
class Keeper:
    """Runs `rbee-keeper` against one inventory and config dir."""

    inventory: Path
    config_dir: Path
    state_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RBEE_", "COLUMNS", "LINES"))}
        env.update(
            {
                "RBEE_CONFIG_DIR": str(self.config_dir),
                "XDG_STATE_HOME": str(self.state_dir),
                "PYTHONUNBUFFERED": "1",
                "COLUMNS": "200",  # a wide terminal: human tables are not cut at 80 columns
                # each run connects itself: a connection holder outliving its test would keep
                # connections to sshds the next test restarts (test_held_connections.py turns it on)
                "RBEE_SSH_PERSIST": "0",
                **HIVE_ENV,
                **self.env_extra,
            }
        )
        return env

    def argv(self, *args: str, json_mode: bool = False) -> list[str]:
        head = [sys.executable, "-m", "rbee_control.keeper.cli", "--inventory", str(self.inventory)]
        return [*head, *(["--json"] if json_mode else []), *args]

    def run(
        self,
        *args: str,
        json_mode: bool = False,
        timeout: float = RUN_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> Run:
        argv = self.argv(*args, json_mode=json_mode)
        started = time.perf_counter()
        proc = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - started
        return Run(
            argv[3:],
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
            seconds,
        )

    def popen(self, *args: str, json_mode: bool = False) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv(*args, json_mode=json_mode),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )

    def known_workers(self) -> list[dict[str, Any]]:
        path = self.config_dir / "known_workers.json"
        return json.loads(path.read_text())["workers"] if path.exists() else []


@dataclass
class Fleet:
    """An inventory `local`, `n2` (127.0.0.2), `n3` (127.0.0.3) with its own homes and keeper."""

    keeper: Keeper
    homes: Path
    nodes: dict[str, sshd.SshdNode]

    def processes(self) -> list[psutil.Process]:
        """rbee-hive / rbee-worker processes whose command line names one of this fleet's homes."""
        return rbee_processes(self.homes)


def rbee_processes(homes: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(homes) in cmdline and (
            "rbee-hive" in cmdline
            or "rbee_control.hive" in cmdline  # a detached daemon: python -m rbee_control.hive.cli daemon
            or "rbee-worker" in cmdline
            or "rbee_worker" in cmdline
        ):
            found.append(proc)
    return found


def make_keeper(base: Path, inventory: Path, **env_extra: str) -> Keeper:
    config = base / "config"
    config.mkdir(parents=True, exist_ok=True)
    state = base / "state"
    state.mkdir(parents=True, exist_ok=True)
    return Keeper(inventory=inventory, config_dir=config, state_dir=state, env_extra=dict(env_extra))


def stop_fleet(keeper: Keeper, homes: Path) -> None:
    """`hive stop --all`, then make sure nothing of these homes is left running."""
    result = keeper.run("hive", "stop", "--all", timeout=120)
    for line in result.err.splitlines():  # what the operator reads, one line per node
        assert "was not running" in line or re.search(r": stopped \(pid \d+, ", line), result
    deadline = time.monotonic() + 15
    left = rbee_processes(homes)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = rbee_processes(homes)
    for proc in left:  # leave the machine clean even when the assertion below fails
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    assert result.rc == 0, str(result)
    assert not left, f"processes left after hive stop --all: {[p.info['cmdline'] for p in left]}"


def _with_hive_env(node: sshd.SshdNode) -> sshd.SshdNode:
    """`node`, restarted so every command it runs sees the hive options of these tests."""
    return node.set_env(HIVE_ENV)


def read_some(proc: subprocess.Popen[bytes], at_least: int, timeout: float) -> bytes:
    """Read stdout until `at_least` bytes arrived (tokens are flowing), bounded by `timeout`."""
    assert proc.stdout is not None
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < at_least:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} bytes of tokens after {timeout}s"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"stdout closed early; stderr: {proc.stderr.read().decode() if proc.stderr else ''}"
            got += chunk
    return got


@pytest.fixture(scope="session")
def keeper_sshd_nodes(sshd_factory: sshd.SshdFactory) -> list[sshd.SshdNode]:
    """Two sshd nodes (127.0.0.2, 127.0.0.3) that hand the hive port range to their commands."""
    try:
        return [_with_hive_env(sshd_factory.start(address)) for address in sshd.NODE_ADDRESSES]
    except sshd.SshdUnavailable as exc:
        pytest.fail(str(exc))


def build_fleet(base: Path, nodes: list[sshd.SshdNode]) -> Fleet:
    base.mkdir(parents=True, exist_ok=True)
    named = {"n2": nodes[0], "n3": nodes[1]}
    homes = base / "homes"
    inventory = sshd.write_inventory(base / "inventory.yaml", named, homes, venv=Path(sys.prefix))
    keeper = make_keeper(base, inventory)
    sshd.trust_nodes(keeper.config_dir, named.values())
    return Fleet(keeper=keeper, homes=homes, nodes=named)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, keeper_sshd_nodes: list[sshd.SshdNode]
) -> Iterator[Fleet]:
    """One fleet for a module; its hives are stopped at the end and no process may remain."""
    built = build_fleet(tmp_path_factory.mktemp("fleet"), keeper_sshd_nodes)
    try:
        yield built
    finally:
        for node in built.nodes.values():
            node.start()  # a test may have stopped it; hive stop needs it
        stop_fleet(built.keeper, built.homes)
