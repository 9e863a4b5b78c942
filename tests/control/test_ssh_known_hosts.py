"""rbee's known_hosts: OpenSSH-compatible format and fingerprints, exact host:port pinning."""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncssh
import pytest

from rbee_control.ssh.known_hosts import KnownHosts, fetch_host_key, fingerprint, host_pattern
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from tests.sshd import SshdNode, free_port


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519").convert_to_public()


def test_fingerprint_matches_ssh_keygen(sshd_nodes: list[SshdNode], tmp_path: Path) -> None:
    pub = tmp_path / "host.pub"
    pub.write_text(sshd_nodes[0].host_public_key + "\n")
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == fingerprint(sshd_nodes[0].host_key)
    assert fingerprint(sshd_nodes[0].host_key).startswith("SHA256:")


def test_trust_lookup_forget(tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "cfg" / "known_hosts")
    assert known.lookup("mac", 22) == []
    a, b, c = new_key(), new_key(), new_key()
    known.trust("mac", 22, a)
    known.trust("mac", 2222, b)
    known.trust("127.0.0.2", 2222, c)
    assert [k.public_data for k in known.lookup("mac", 22)] == [a.public_data]
    assert [k.public_data for k in known.lookup("mac", 2222)] == [b.public_data]
    assert known.is_trusted("127.0.0.2", 2222, c) and not known.is_trusted("127.0.0.2", 22, c)
    lines = known.path.read_text().splitlines()
    assert lines[0].startswith("mac ssh-ed25519 ") and lines[1].startswith("[mac]:2222 ssh-ed25519 ")
    assert known.path.stat().st_mode & 0o777 == 0o600

    known.trust("mac", 22, b)
    assert [k.public_data for k in known.lookup("mac", 22)] == [b.public_data]
    assert known.forget("mac", 2222) == 1
    assert known.lookup("mac", 2222) == [] and known.lookup("127.0.0.2", 2222)
    assert host_pattern("h", 22) == "h" and host_pattern("h", 2200) == "[h]:2200"


def test_hashed_entries_written_by_ssh_keygen_are_understood(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    key = new_key()
    KnownHosts(path).trust("127.0.0.9", 2022, key)
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], capture_output=True, check=True)
    assert path.read_text().startswith("|1|")
    assert KnownHosts(path).is_trusted("127.0.0.9", 2022, key)
    assert not KnownHosts(path).is_trusted("127.0.0.9", 22, key)


def test_openssh_accepts_rbee_known_hosts(sshd_nodes: list[SshdNode], tmp_path: Path) -> None:
    sshd = sshd_nodes[1]
    known = KnownHosts(tmp_path / "known_hosts")
    known.trust(sshd.host, sshd.port, sshd.host_key)
    result = subprocess.run(
        ["ssh", "-F", "none", "-o", f"UserKnownHostsFile={known.path}", "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes", "-i", str(sshd.client_key), "-p", str(sshd.port), f"{sshd.user}@{sshd.host}",
         "echo", "pinned"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pinned\n"


async def test_fetch_host_key(sshd_nodes: list[SshdNode]) -> None:
    key = await fetch_host_key(sshd_nodes[0].host, sshd_nodes[0].port)
    assert key.public_data == sshd_nodes[0].host_key.public_data
    with pytest.raises(RbeeError) as info:
        await fetch_host_key("127.0.0.4", free_port("127.0.0.4"), timeout=2)
    assert info.value.code == ErrorCode.CONNECTION_FAILED
