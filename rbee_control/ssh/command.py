"""What a node command is on the wire: argv, its shell rendering, and its outcome.

argv is always a list; for SSH it becomes one shell string in which every word
is `shlex.quote`d, so a model name or a prompt can never become shell syntax.
The one exception is spelled out by type: a `NodePath` starting with `~/` names
a path under the *node* user's home and renders as `"$HOME"/'rest'`.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rbee_worker.protocol.errors import ErrorCode, RbeeError

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: Prints the command's pid on stderr before exec'ing it, so the keeper can kill it
#: by pid when the server ignores SSH signal requests (e.g. OpenSSH for root logins).
PID_MARKER = "rbee-pid:"
_PID_PREAMBLE = f'printf "{PID_MARKER}%s\\n" "$$" >&2; exec "$@"'


class NodePath(str):
    """A path on the node; a leading `~/` means the node user's home, not the keeper's."""

    __slots__ = ()

    def shell(self) -> str:
        """The path as one shell word, `~` expanded by the node's shell and nothing else."""
        if self == "~":
            return '"$HOME"'
        if self.startswith("~/"):
            rest = self[2:]
            return '"$HOME"/' + (shlex.quote(rest) if rest else "")
        return shlex.quote(str(self))

    def local(self) -> str:
        """The path on this machine (for `transport: local`)."""
        return os.path.expanduser(str(self))

    def joinpath(self, *parts: str) -> NodePath:
        return NodePath("/".join([self.rstrip("/"), *parts]))


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A finished command. Killed by a signal N → exit_status 128+N, as a shell reports it."""

    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def check_argv(argv: Sequence[str]) -> list[str]:
    """Refuse argv that is not a non-empty list of strings (a bare string is a bug here)."""
    if isinstance(argv, str | bytes) or not argv:
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"argv must be a non-empty list of strings, got {argv!r}")
    out = list(argv)
    for arg in out:
        if not isinstance(arg, str):
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"argv items must be strings, got {arg!r}")
        if "\x00" in arg:
            raise RbeeError(ErrorCode.INVALID_REQUEST, "arguments must not contain NUL bytes")
    if out[0].startswith("-"):
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"program name must not start with '-': {out[0]!r}")
    return out


def check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(env or {})
    for name, value in out.items():
        if not ENV_NAME_RE.fullmatch(name):
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"invalid environment variable name {name!r}")
        if not isinstance(value, str) or "\x00" in value:
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"invalid value for environment variable {name}")
    return out


def shell_word(arg: str) -> str:
    return arg.shell() if isinstance(arg, NodePath) else shlex.quote(arg)


def remote_command_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The command string sent over SSH: `sh -c '<pid preamble>' rbee [env VAR=v…] argv…`, all quoted.

    Environment goes through `env` on the command line because sshd only passes
    variables its AcceptEnv allows.
    """
    words = ["sh", "-c", shlex.quote(_PID_PREAMBLE), "rbee"]
    variables = check_env(env)
    if variables:
        words.append("env")
        words.extend(shlex.quote(f"{name}=") + shell_word(value) for name, value in variables.items())
    words.extend(shell_word(arg) for arg in check_argv(argv))
    return " ".join(words)


def local_argv(argv: Sequence[str]) -> list[str]:
    return [arg.local() if isinstance(arg, NodePath) else arg for arg in check_argv(argv)]


def local_env(env: Mapping[str, str] | None) -> dict[str, str]:
    variables = check_env(env)
    return {**os.environ, **{k: v.local() if isinstance(v, NodePath) else v for k, v in variables.items()}}


def signal_exit_status(signum: int) -> int:
    return 128 + signum
