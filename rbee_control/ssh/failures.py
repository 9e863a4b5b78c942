"""SSH failures as `RbeeError`s an operator can act on: a code, one line, a command to run.

CONNECTION_TIMEOUT / CONNECTION_FAILED for the network and authentication,
HOST_KEY_UNKNOWN / HOST_KEY_CHANGED for the pinned host keys (the message
carries the fingerprint so it can be checked out of band).
"""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import asyncssh

from rbee_worker.protocol.errors import ErrorCode, RbeeError


def describe(exc: BaseException, host: str) -> str:
    """A short human reason for a network or SSH exception."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host name {host!r}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    return str(exc) or type(exc).__name__


def connection_error(
    label: str, host: str, port: int, exc: BaseException, *, attempts: int, timeout: float
) -> RbeeError:
    """The node could not be reached (after `attempts` tries of `timeout` seconds each)."""
    timed_out = isinstance(exc, TimeoutError)
    tries = f"after {attempts} attempts" if attempts > 1 else ""
    reason = f"timed out ({timeout:g}s per attempt)" if timed_out else describe(exc, host)
    if timed_out:
        hint = f"check that {host} is up and reachable: ping {host}"
    elif isinstance(exc, socket.gaierror):
        hint = "check the node's ssh.host in the inventory: rbee-keeper setup list-nodes"
    else:
        hint = f"check that sshd runs on {host} and listens on port {port}"
    return RbeeError(
        ErrorCode.CONNECTION_TIMEOUT if timed_out else ErrorCode.CONNECTION_FAILED,
        " ".join(filter(None, [f"cannot connect to {label} at {host}:{port}", tries])) + f": {reason}",
        status=504 if timed_out else 502,
        details={"node": label, "host": host, "port": port, "attempts": attempts, "reason": reason},
        hint=hint,
    )


def auth_failed(label: str, target: str, key: str | None, exc: BaseException) -> RbeeError:
    """The server refused every key we offered; retrying cannot help."""
    which = f"key {key}" if key else "the ssh-agent and default keys"
    login, _, port = target.rpartition(":")
    ssh_cmd = shlex.join(["ssh", "-i", key, "-p", port, login]) if key else ""
    hint = f"check the key: chmod 600 {shlex.quote(key)}; {ssh_cmd}" if key else "check your keys: ssh-add -l"
    return RbeeError(
        ErrorCode.CONNECTION_FAILED,
        f"SSH authentication failed for {target} with {which}: {describe(exc, target)}",
        details={"node": label, "target": target, "key": key},
        hint=hint,
    )


def key_unusable(label: str, key: str, problem: str) -> RbeeError:
    return RbeeError(
        ErrorCode.CONNECTION_FAILED,
        f"SSH key for node {label} {problem}: {key}",
        status=400,
        details={"node": label, "key": key},
        hint="check nodes.<name>.ssh.key in the inventory (or load the key into ssh-agent and drop it)",
    )


def trust_command(label: str, host: str, port: int) -> str:
    port_flag = f" --ssh-port {port}" if port != 22 else ""
    return f"rbee-keeper setup add-node {label} --ssh-host {host}{port_flag} --trust"


def host_key_unknown(
    label: str, host: str, port: int, key_type: str, fingerprint: str, known_hosts: Path
) -> RbeeError:
    return RbeeError(
        ErrorCode.HOST_KEY_UNKNOWN,
        f"host key of node {label} ({host}:{port}) is not trusted yet: {key_type} {fingerprint}",
        details={
            "node": label,
            "host": host,
            "port": port,
            "key_type": key_type,
            "fingerprint": fingerprint,
            "known_hosts": str(known_hosts),
        },
        hint="check the fingerprint on the node (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), "
        f"then trust it: {trust_command(label, host, port)}",
    )


def host_key_changed(
    label: str, host: str, port: int, expected: list[str], actual: str | None, known_hosts: Path
) -> RbeeError:
    now = f"; it now presents {actual}" if actual else ""
    return RbeeError(
        ErrorCode.HOST_KEY_CHANGED,
        f"host key of node {label} ({host}:{port}) has CHANGED (pinned {', '.join(expected)}{now}). "
        "Someone may be intercepting the connection, or the node was reinstalled; not connecting",
        details={
            "node": label,
            "host": host,
            "port": port,
            "expected": expected,
            "actual": actual,
            "known_hosts": str(known_hosts),
        },
        hint=f"if the node was reinstalled, verify the new fingerprint on it, remove the "
        f"{host if port == 22 else f'[{host}]:{port}'} line from {known_hosts}, then: "
        f"{trust_command(label, host, port)}",
    )


def connection_lost(label: str, exc: BaseException) -> RbeeError:
    return RbeeError(
        ErrorCode.CONNECTION_FAILED,
        f"SSH connection to node {label} lost: {describe(exc, label)}",
        details={"node": label},
    )
