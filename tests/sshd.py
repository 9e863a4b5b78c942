"""Real OpenSSH servers on loopback addresses, standing in for separate nodes in tests.

Each `SshdNode` is an unprivileged-port `sshd -D` with its own host key, config,
authorized_keys and pid file in a temp directory, listening on 127.0.0.X. All
nodes of one factory accept the same generated ed25519 client key.

In a conftest, import the fixtures (they are defined at the end of this module):

    from tests.sshd import rbee_config_dir, sshd_factory, sshd_nodes, ssh_inventory_path  # noqa: F401

or drive it directly:

    factory = SshdFactory(tmp_path)
    node = factory.start("127.0.0.2")   # node.stop() / node.start() simulate a node going down
    ...
    factory.close()

`trust_nodes` pins host keys in rbee's known_hosts under a config dir and
`write_inventory` turns started nodes into an `inventory.yaml`, each node with
its own `home` (optionally with `venv -> <this venv>`, so node commands find the
checkout's `rbee-hive`).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import psutil
import pytest

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 10.0


class SshdUnavailable(RuntimeError):
    """sshd cannot run here; tests must fail loudly rather than skip."""


@dataclass
class SshdNode:
    """One running sshd: where it listens and the keys to reach and pin it."""

    host: str
    port: int
    user: str
    client_key: Path
    host_public_key: str
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def host_key(self) -> asyncssh.SSHKey:
        return asyncssh.import_public_key(self.host_public_key)

    @property
    def log_path(self) -> Path:
        return self.workdir / "sshd.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "sshd_config"

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """(Re)start this sshd with its config and wait until it accepts connections."""
        if self.is_running():
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _wait_listening(self)

    def set_env(self, env: dict[str, str]) -> SshdNode:
        """Restart sshd so every command it runs sees `env` (sshd honours only its first SetEnv line)."""
        config = self.config_path.read_text()
        extra = " ".join(f"{k}={v}" for k, v in env.items())
        if "SetEnv " in config:
            config = config.replace("SetEnv SHLVL=2", f"SetEnv SHLVL=2 {extra}", 1)
        else:
            config += f"SetEnv {extra}\n"
        self.config_path.write_text(config)
        self.stop()
        self.start()
        return self

    def stop(self) -> None:
        """Stop sshd and its per-connection processes (open connections drop), as if the node went down."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class SshdFactory:
    """Starts sshd nodes sharing one client key; `close()` stops them all."""

    def __init__(self, base_dir: Path, *, skip_bashrc: bool = True) -> None:
        check_sshd_available()
        self.skip_bashrc = skip_bashrc
        self.base_dir = base_dir
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.client_key = base_dir / "client_ed25519"
        if not self.client_key.exists():
            key = asyncssh.generate_private_key("ssh-ed25519")
            key.write_private_key(str(self.client_key))
            self.client_key.chmod(0o600)
            key.write_public_key(str(self.client_key) + ".pub")
        self.nodes: list[SshdNode] = []

    def start(self, host: str = "127.0.0.2", port: int | None = None) -> SshdNode:
        """Start one sshd on `host` (a free port if none given) and wait until it accepts."""
        workdir = self.base_dir / f"sshd-{host}-{len(self.nodes)}"
        workdir.mkdir(parents=True, exist_ok=True)
        host_key_path = workdir / "host_ed25519"
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(host_key_path))
        host_key_path.chmod(0o600)
        authorized = workdir / "authorized_keys"
        authorized.write_text(Path(str(self.client_key) + ".pub").read_text())
        node = SshdNode(
            host=host,
            port=port or free_port(host),
            user=self.user,
            client_key=self.client_key,
            host_public_key=host_key.export_public_key().decode().strip(),
            workdir=workdir,
        )
        node.config_path.write_text(_sshd_config(node, host_key_path, authorized, self.skip_bashrc))
        self.nodes.append(node)
        node.start()
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()


def check_sshd_available() -> None:
    """Raise `SshdUnavailable` with what to install or fix."""
    if not os.access(SSHD, os.X_OK):
        raise SshdUnavailable(f"{SSHD} not found: install openssh-server (apt-get install openssh-server)")
    if not PRIVSEP_DIR.is_dir():
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise SshdUnavailable(f"sshd needs the directory {PRIVSEP_DIR}: {exc}") from exc


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


#: bash sources ~/.bashrc for commands run by sshd unless SHLVL says it is nested; a slow
#: ~/.bashrc (pyenv init, nvm, …) would otherwise cost ~0.3 s per command and dominate test time.
_SKIP_BASHRC = ["# keep bash from sourcing ~/.bashrc for each command (speed)", "SetEnv SHLVL=2"]


def _sshd_config(node: SshdNode, host_key: Path, authorized: Path, skip_bashrc: bool) -> str:
    sftp_server = "/usr/lib/openssh/sftp-server"
    subsystem = sftp_server if os.access(sftp_server, os.X_OK) else "internal-sftp"
    return "\n".join(
        [
            f"ListenAddress {node.host}:{node.port}",
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {authorized}",
            f"PidFile {node.workdir / 'sshd.pid'}",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {node.user}",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "MaxSessions 10",
            # the keeper reads each hive's socket over a streamlocal channel (the OpenSSH default)
            "AllowStreamLocalForwarding yes",
            "MaxStartups 50:30:100",
            "LogLevel ERROR",
            *(_SKIP_BASHRC if skip_bashrc else []),
            f"Subsystem sftp {subsystem}",
            "",
        ]
    )


def _wait_listening(node: SshdNode) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not node.is_running():
            log = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
            raise SshdUnavailable(f"sshd on {node.host}:{node.port} exited at startup:\n{log}")
        with contextlib.suppress(OSError), socket.create_connection((node.host, node.port), timeout=0.5):
            return
        time.sleep(0.05)
    node.stop()
    raise SshdUnavailable(f"sshd on {node.host}:{node.port} did not accept connections in {START_TIMEOUT}s")


def trust_nodes(config_dir: Path, nodes: Iterable[SshdNode]) -> Path:
    """Pin the nodes' host keys in rbee's known_hosts under `config_dir`."""
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "known_hosts"
    lines = [f"[{n.host}]:{n.port} {n.host_public_key}\n" for n in nodes]
    with open(path, "a") as fh:
        fh.writelines(lines)
    return path


def write_inventory(
    path: Path,
    nodes: dict[str, SshdNode],
    homes_dir: Path,
    *,
    local_node: str | None = "local",
    venv: Path | None = None,
) -> Path:
    """Write an inventory with one ssh node per entry (plus a local one), each with its own home.

    With `venv`, each home gets `venv -> <venv>` so `<home>/venv/bin/rbee-hive`
    (what the keeper runs on a node) is this checkout's installed CLI.
    """
    lines = ["# written by tests/sshd.py", "nodes:"]
    names = ([local_node] if local_node else []) + list(nodes)
    for name in names:
        home = homes_dir / name
        home.mkdir(parents=True, exist_ok=True)
        if venv is not None and not (home / "venv").exists():
            (home / "venv").symlink_to(venv)
        lines.append(f"  {name}:")
        if name in nodes:
            node = nodes[name]
            ssh = f"host: {node.host}, port: {node.port}, user: {node.user}, key: '{node.client_key}'"
            lines.append(f"    ssh: {{{ssh}}}")
        else:
            lines.append("    transport: local")
        lines.append(f"    home: '{home}'")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- pytest fixtures (import them into a conftest) ---------------------------------------

NODE_ADDRESSES = ("127.0.0.2", "127.0.0.3")


@pytest.fixture(scope="session")
def sshd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdFactory]:
    """Starts sshd nodes for the session; all of them are stopped at the end."""
    try:
        factory = SshdFactory(tmp_path_factory.mktemp("sshd"))
    except SshdUnavailable as exc:
        pytest.fail(f"these tests need a real OpenSSH server: {exc}")
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def sshd_nodes(sshd_factory: SshdFactory) -> list[SshdNode]:
    """Two running sshd nodes, on 127.0.0.2 and 127.0.0.3."""
    try:
        return [sshd_factory.start(address) for address in NODE_ADDRESSES]
    except SshdUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture
def rbee_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private `$RBEE_CONFIG_DIR` (rbee's known_hosts lives there)."""
    path = tmp_path / "config"
    path.mkdir()
    monkeypatch.setenv("RBEE_CONFIG_DIR", str(path))
    return path


@pytest.fixture
def ssh_inventory_path(tmp_path: Path, sshd_nodes: list[SshdNode], rbee_config_dir: Path) -> Path:
    """inventory.yaml with nodes `local`, `n2` (127.0.0.2) and `n3` (127.0.0.3), host keys trusted.

    Each node's home is `tmp_path/homes/<name>` with `venv -> ` this interpreter's venv.
    """
    nodes = {"n2": sshd_nodes[0], "n3": sshd_nodes[1]}
    trust_nodes(rbee_config_dir, nodes.values())
    return write_inventory(tmp_path / "inventory.yaml", nodes, tmp_path / "homes", venv=Path(sys.prefix))
