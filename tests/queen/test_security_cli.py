"""`queen-rbee` as a process: keys by default, no unauthenticated LAN bind, slow clients bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..slow_clients import half_open, wait_all_closed
from ..worker_proc import free_port

HEAD_TIMEOUT = 2.0
ATTACK = 300


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_QUEEN_")}
    return {**env, "RBEE_INVENTORY": "", "RBEE_CONFIG_DIR": str(tmp_path / "config"), **extra}


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbee_control.queen", *args],
        env=_env(tmp_path, **env), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


class Running:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"queen-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rbee_control.queen", "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[type[Running]]:
    started: list[Running] = []

    class Start(Running):
        def __init__(self, *args: str) -> None:
            started.append(self)
            super().__init__(tmp_path, *args)

    yield Start
    for queen in started:
        queen.stop()


def test_no_key_on_a_lan_bind_is_refused_before_binding(tmp_path: Path) -> None:
    # The port is taken: had the queen tried to bind, it would have said so instead.
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = str(taken.getsockname()[1])
        for host in ("0.0.0.0", "192.0.2.10"):
            done = _run(tmp_path, "--no-inventory", "--insecure-no-auth", "--host", host, "--port", port)
            assert done.returncode == 1, done.stderr
            lines = [line for line in done.stderr.splitlines() if line.startswith("queen-rbee:")]
            assert len(lines) == 1 and "refusing --insecure-no-auth" in lines[0] and host in lines[0]
    assert not (tmp_path / "config").exists()  # nothing was written either


def test_keeper_serve_refuses_the_same(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rbee_control.keeper.cli", "serve", "--insecure-no-auth", "--host", "0.0.0.0",
         "--port", str(free_port())],
        env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "refusing --insecure-no-auth" in done.stderr, done.stderr


def test_a_first_start_mints_both_keys_into_a_private_secrets_file(
    tmp_path: Path, start: type[Running]
) -> None:
    queen = start("--no-inventory")
    secrets_file = tmp_path / "config" / "inventory.secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    stored = json.loads(secrets_file.read_text())
    client, admin = stored["queen_key"], stored["queen_admin_key"]
    assert client and admin and client != admin
    log = queen.log.read_text()
    assert f"client key created: {secrets_file}" in log and f"admin key created: {secrets_file}" in log
    assert client not in log and admin not in log
    shown = _run(tmp_path, "--no-inventory", "--show-key", "client")
    assert shown.returncode == 0 and shown.stdout.strip() == client
    with httpx.Client(base_url=queen.url, timeout=30) as http:
        assert http.get("/v1/models").status_code == 401
        as_client = {"Authorization": f"Bearer {client}"}
        assert http.get("/v1/models", headers=as_client).status_code == 200
        assert http.get("/v2/workers/list", headers=as_client).status_code == 403
        as_admin = {"Authorization": f"Bearer {admin}"}
        assert http.get("/v2/workers/list", headers=as_admin).status_code == 200
    queen.stop()
    assert queen.proc.returncode == 0
    # a second start reads the same keys
    again = start("--no-inventory")
    assert "client key read" in again.log.read_text()
    assert json.loads(secrets_file.read_text())["queen_key"] == client


def test_insecure_no_auth_on_loopback_opens_only_the_client_plane(
    tmp_path: Path, start: type[Running]
) -> None:
    queen = start("--no-inventory", "--insecure-no-auth")
    stored = json.loads((tmp_path / "config" / "inventory.secrets.json").read_text())
    assert "queen_key" not in stored and stored["queen_admin_key"]
    with httpx.Client(base_url=queen.url, timeout=30) as anyone:
        assert anyone.get("/v1/models").status_code == 200
        assert anyone.get("/v2/workers/list").status_code == 401
        admin = {"Authorization": f"Bearer {stored['queen_admin_key']}"}
        assert anyone.get("/v2/workers/list", headers=admin).status_code == 200


def test_a_loose_secrets_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    loose = config / "inventory.secrets.json"
    loose.write_text('{"queen_key": "k", "queen_admin_key": "a"}')
    loose.chmod(0o644)
    done = _run(tmp_path, "--no-inventory", "--port", str(free_port()))
    assert done.returncode == 1 and "chmod 600" in done.stderr


@pytest.mark.parametrize(
    "args",
    [["--register-network", "10.0.0.0/33"], ["--head-timeout", "0"], ["--max-connections", "0"]],
)
def test_bad_access_options_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    done = _run(tmp_path, "--no-inventory", "--port", str(free_port()), *args)
    assert done.returncode == 2 and done.stderr.startswith("queen-rbee:"), done.stderr


def test_half_open_connections_are_closed_while_the_queen_keeps_answering(
    tmp_path: Path, start: type[Running]
) -> None:
    key = "slow-clients-key"
    queen = start("--no-inventory", "--api-key", key, "--head-timeout", str(HEAD_TIMEOUT))
    headers = {"Authorization": f"Bearer {key}"}
    with half_open("127.0.0.1", queen.port, ATTACK) as held:
        with httpx.Client(base_url=queen.url, headers=headers, timeout=30) as client:
            assert client.get("/v1/models").status_code == 200
            assert client.get("/health").status_code == 200
        outcome = wait_all_closed(held, timeout=HEAD_TIMEOUT + 60)
        assert outcome["open"] == 0, outcome
        assert outcome["408"] >= 100, outcome
    assert httpx.get(f"{queen.url}/v1/models", headers=headers, timeout=10).status_code == 200
