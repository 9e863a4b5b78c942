"""rbee's own known_hosts: the node host keys the operator has agreed to trust.

OpenSSH format (`[host]:port keytype base64` for ports other than 22) so it can be
read with `ssh -o UserKnownHostsFile=…`, but separate from `~/.ssh/known_hosts`:
rbee pins exactly the keys recorded by `setup add-node`, never trusts on first
use and never accepts a changed key by itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
from pathlib import Path

import asyncssh

from rbee_control.inventory.atomic import atomic_write
from rbee_control.inventory.paths import known_hosts_path
from rbee_control.ssh.failures import connection_error

DEFAULT_PORT = 22


def host_pattern(host: str, port: int = DEFAULT_PORT) -> str:
    """How OpenSSH names a host in known_hosts: `host` on 22, `[host]:port` otherwise."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def fingerprint(key: asyncssh.SSHKey) -> str:
    """`SHA256:…`, the fingerprint `ssh-keygen -lf` and ssh itself print."""
    return key.get_fingerprint("sha256")


def key_line(key: asyncssh.SSHKey) -> str:
    """`keytype base64` without a comment."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


async def fetch_host_key(host: str, port: int = DEFAULT_PORT, timeout: float = 10.0) -> asyncssh.SSHKey:
    """Ask the server for its host key without authenticating (for `setup add-node --trust`)."""
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port, config=None), timeout)
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        raise connection_error(f"{host}:{port}", host, port, exc, attempts=1, timeout=timeout) from None
    if key is None:
        raise connection_error(
            f"{host}:{port}",
            host,
            port,
            ConnectionError("server sent no host key"),
            attempts=1,
            timeout=timeout,
        )
    return key


class KnownHosts:
    """Lookups and edits of one known_hosts file (rbee's, unless a path is given)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else known_hosts_path()

    def lookup(self, host: str, port: int = DEFAULT_PORT) -> list[asyncssh.SSHKey]:
        """Every key pinned for host:port (usually one)."""
        pattern = host_pattern(host, port)
        keys: list[asyncssh.SSHKey] = []
        for patterns, key_text in self._entries():
            if any(_matches(p, pattern) for p in patterns.split(",")):
                try:
                    keys.append(asyncssh.import_public_key(key_text))
                except (asyncssh.KeyImportError, ValueError):
                    continue
        return keys

    def is_trusted(self, host: str, port: int, key: asyncssh.SSHKey) -> bool:
        wanted = key.public_data
        return any(k.public_data == wanted for k in self.lookup(host, port))

    def trust(self, host: str, port: int, key: asyncssh.SSHKey) -> None:
        """Pin `key` for host:port, replacing any key pinned before."""
        pattern = host_pattern(host, port)
        kept = [line for line in self._lines() if not _line_names(line, pattern)]
        kept.append(f"{pattern} {key_line(key)}\n")
        self._write(kept)

    def forget(self, host: str, port: int = DEFAULT_PORT) -> int:
        """Unpin host:port; how many entries were removed."""
        pattern = host_pattern(host, port)
        lines = self._lines()
        kept = [line for line in lines if not _line_names(line, pattern)]
        if len(kept) != len(lines):
            self._write(kept)
        return len(lines) - len(kept)

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        except FileNotFoundError:
            return []

    def _entries(self) -> list[tuple[str, str]]:
        out = []
        for line in self._lines():
            fields = line.split()
            if len(fields) < 3 or fields[0].startswith(("#", "@")):
                continue
            out.append((fields[0], f"{fields[1]} {fields[2]}"))
        return out

    def _write(self, lines: list[str]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        atomic_write(self.path, text.encode("utf-8"), mode=0o600)


def _line_names(line: str, pattern: str) -> bool:
    fields = line.split()
    if len(fields) < 3 or fields[0].startswith(("#", "@")):
        return False
    return any(_matches(p, pattern) for p in fields[0].split(","))


def _matches(entry: str, pattern: str) -> bool:
    """Exact names and OpenSSH hashed names (`|1|salt|hash`); wildcards are not used here."""
    if entry.startswith("|1|"):
        try:
            _, _, salt, digest = entry.split("|")
            mac = hmac.new(base64.b64decode(salt), pattern.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(mac, base64.b64decode(digest))
        except ValueError:
            return False
    return entry == pattern
