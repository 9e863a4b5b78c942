"""Opening the SSH connection to a node: pinned host key, bounded retries, precise errors.

A node is only ever contacted with the host keys rbee's known_hosts pins for it.
With no pinned key the server's key is fetched just to show its fingerprint in
HOST_KEY_UNKNOWN; a different key is HOST_KEY_CHANGED. Neither is retried, nor is
a refused login; network failures get `attempts` tries with a short backoff.
`~/.ssh/config` is not read: the inventory alone says where a node is.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Sequence

import asyncssh

from rbee_control.inventory.model import Node
from rbee_control.ssh.failures import (
    auth_failed,
    connection_error,
    host_key_changed,
    host_key_unknown,
    key_unusable,
)
from rbee_control.ssh.known_hosts import KnownHosts, fingerprint
from rbee_worker.protocol.errors import ErrorCode, RbeeError

CONNECT_TIMEOUT = 10.0
#: Overrides CONNECT_TIMEOUT for every ssh node: a fleet on a slow link may need more, a test of a
#: hung node less.
CONNECT_TIMEOUT_ENV = "RBEE_SSH_CONNECT_TIMEOUT"
ATTEMPTS = 3
BACKOFF: tuple[float, ...] = (0.2, 0.4)
KEEPALIVE_INTERVAL = 15.0
#: AES-GCM first: with AES-NI it costs asyncssh half the CPU of chacha20-poly1305, which took SFTP
#: pushes from 0.75x to 0.98x of scp on loopback. The rest keeps any OpenSSH server reachable.
ENCRYPTION_ALGS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

#: Failures worth another attempt: refused, unreachable, reset, dropped mid-handshake. A timeout is
#: not retried: a node that accepts TCP and then says nothing would cost ATTEMPTS x timeout, and a
#: fan-out promises that a down node costs its timeout once. (Host-key and login failures are turned
#: into RbeeError before they get here.)
RETRYABLE: tuple[type[BaseException], ...] = (OSError, asyncssh.DisconnectError)


def default_connect_timeout() -> float:
    """Seconds per connect attempt: $RBEE_SSH_CONNECT_TIMEOUT if set, else CONNECT_TIMEOUT."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not raw:
        return CONNECT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"{CONNECT_TIMEOUT_ENV} must be a positive number of seconds, not {raw!r}",
            details={"variable": CONNECT_TIMEOUT_ENV, "value": raw},
            hint=f"unset it for the default of {CONNECT_TIMEOUT:g}s, or set e.g. {CONNECT_TIMEOUT_ENV}=5",
        )
    return seconds


async def open_connection(
    node: Node,
    known_hosts: KnownHosts,
    *,
    timeout: float = CONNECT_TIMEOUT,
    attempts: int = ATTEMPTS,
    backoff: Sequence[float] = BACKOFF,
) -> asyncssh.SSHClientConnection:
    """Connect and authenticate to an ssh node, or raise the RbeeError that explains why not."""
    if node.ssh is None:
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"node {node.name} has no ssh settings")
    client_keys = _client_keys(node)
    last: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(backoff[min(attempt - 1, len(backoff) - 1)] if backoff else 0)
        try:
            return await _connect_once(node, known_hosts, client_keys, timeout)
        except TimeoutError as exc:  # a subclass of OSError: test it first
            raise connection_error(
                node.name, node.ssh.host, node.ssh.port, exc, attempts=attempt + 1, timeout=timeout
            ) from None
        except RETRYABLE as exc:
            last = exc
    assert last is not None
    raise connection_error(node.name, node.ssh.host, node.ssh.port, last, attempts=attempts, timeout=timeout)


def _client_keys(node: Node) -> Sequence[str] | tuple[()]:
    """The inventory's key file if it names one; else asyncssh's defaults (agent, ~/.ssh/id_*)."""
    assert node.ssh is not None
    if not node.ssh.key:
        return ()
    path = os.path.expanduser(node.ssh.key)
    if not os.path.isfile(path):
        raise key_unusable(node.name, path, "not found")
    if not os.access(path, os.R_OK):
        raise key_unusable(node.name, path, "is not readable")
    return [path]


async def _connect_once(
    node: Node, known_hosts: KnownHosts, client_keys: Sequence[str] | tuple[()], timeout: float
) -> asyncssh.SSHClientConnection:
    ssh = node.ssh
    assert ssh is not None
    trusted = known_hosts.lookup(ssh.host, ssh.port)
    if not trusted:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(ssh.host, ssh.port, config=None), timeout)
        if key is None:
            raise ConnectionError("server sent no host key")
        raise host_key_unknown(
            node.name, ssh.host, ssh.port, key.get_algorithm(), fingerprint(key), known_hosts.path
        )
    try:
        return await asyncssh.connect(
            ssh.host,
            port=ssh.port,
            username=ssh.user or (),
            client_keys=client_keys or (),
            known_hosts=(trusted, [], []),
            config=None,
            connect_timeout=timeout,
            keepalive_interval=KEEPALIVE_INTERVAL,
            encryption_algs=ENCRYPTION_ALGS,
            # keys and the agent only: asyncssh would set up GSSAPI (Kerberos) for every
            # connection, 2 ms of CPU each, a third of a 32-node status
            gss_host=None,
        )
    except (asyncssh.HostKeyNotVerifiable, asyncssh.KeyExchangeFailed):
        actual = await _actual_fingerprint(ssh.host, ssh.port, timeout)
        raise host_key_changed(
            node.name, ssh.host, ssh.port, [fingerprint(k) for k in trusted], actual, known_hosts.path
        ) from None
    except asyncssh.PermissionDenied as exc:
        raise auth_failed(node.name, ssh.target, ssh.key, exc) from None
    except asyncssh.KeyImportError as exc:
        raise key_unusable(
            node.name,
            ssh.key or "?",
            f"cannot be loaded ({exc}); is it passphrase-protected? load it into ssh-agent instead",
        ) from None


async def _actual_fingerprint(host: str, port: int, timeout: float) -> str | None:
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port, config=None), timeout)
    except (OSError, TimeoutError, asyncssh.Error):
        return None
    return f"{key.get_algorithm()} {fingerprint(key)}" if key is not None else None
