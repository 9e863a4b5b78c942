"""Fixtures for hive tests: a node home, the real `rbee-hive` CLI bound to it, and test servers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from rbee_worker.protocol.node_events import NodeEvent, parse_line

from .servers import FileServer, serve_in_thread

_SCRIPT = Path(sys.executable).with_name("rbee-hive")
HIVE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "rbee_control.hive.cli"]


@dataclass
class Run:
    rc: int
    events: list[NodeEvent]
    stderr: str
    seconds: float

    @property
    def final(self) -> NodeEvent:
        assert self.events and self.events[-1].is_final, self.stderr
        assert sum(e.is_final for e in self.events) == 1, self.events
        return self.events[-1]

    @property
    def result(self) -> dict[str, Any]:
        assert self.rc == 0 and self.final.event == "result", (self.rc, self.events, self.stderr)
        return self.final.data

    @property
    def error(self) -> dict[str, Any]:
        assert self.rc == 1 and self.final.event == "error", (self.rc, self.events, self.stderr)
        return self.final.data


class Hive:
    """One node: its `$RBEE_HOME` and the CLI pointed at it."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env

    def run(self, *args: str, timeout: float = 60) -> Run:
        t0 = time.monotonic()
        proc = subprocess.run(
            [*HIVE, *args, "--home", str(self.home), "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        # every stdout line must be one of our events: that is the contract with the keeper
        events = [parse_line(line) for line in proc.stdout.splitlines()]
        return Run(proc.returncode, events, proc.stderr, time.monotonic() - t0)

    def ok(self, *args: str) -> dict[str, Any]:
        """Run and insist on success; the result payload."""
        return self.run(*args).result

    def start(self, *options: str) -> dict[str, Any]:
        return self.run("daemon", "--detach", *options).result

    def stop(self) -> dict[str, Any]:
        return self.run("stop").result

    @property
    def daemon_pid(self) -> int | None:
        try:
            return int((self.home / "hive.pid").read_text())
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        path = self.home / "logs" / "hive.log"
        return path.read_text() if path.exists() else ""

    def model_files(self) -> list[str]:
        models = self.home / "models"
        return sorted(p.name for p in models.iterdir()) if models.exists() else []


@pytest.fixture(scope="session")
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    with serve_in_thread(server.app()) as url:
        server.url = url
        yield server


def hive_env(tmp: Path, file_server: FileServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBEE_", "HF_"))}
    env.update(
        RBEE_HIVE_DOWNLOAD_BACKOFF="0.01",
        HF_ENDPOINT=file_server.url,
        HF_HOME=str(tmp / "hf"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def cleanup(hive: Hive) -> None:
    """Whatever a test did, leave no daemon and no worker behind."""
    if (hive.home / "hive.pid").exists() or list((hive.home / "workers").glob("*.json")):
        hive.run("stop")


@pytest.fixture
def hive(tmp_path: Path, file_server: FileServer) -> Iterator[Hive]:
    node = Hive(tmp_path / "home", hive_env(tmp_path, file_server))
    yield node
    cleanup(node)


@pytest.fixture
def model_copy(tmp_path: Path, tiny_model: Path) -> Path:
    """A private copy of the tiny model (a test may corrupt or link it)."""
    return Path(shutil.copy(tiny_model, tmp_path / "tiny-copy.gguf"))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
