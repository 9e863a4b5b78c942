"""The inventory as typed values: what the rest of rbee reads after `load_inventory`.

Every default is applied here once (home, python, backends, address, ssh user),
so no caller has to know which fields an operator may leave out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rbee_control.inventory.placements import ModelPlacement
from rbee_control.inventory.suggest import did_you_mean
from rbee_worker.protocol.errors import ErrorCode, RbeeError

if TYPE_CHECKING:
    from rbee_control.inventory.upstreams import Upstream

Transport = Literal["local", "ssh"]
TRANSPORTS: tuple[Transport, ...] = ("local", "ssh")
KNOWN_BACKENDS: tuple[str, ...] = ("cpu", "cuda", "metal")
NODE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEFAULT_HOME = "~/.local/share/rbee"
DEFAULT_PYTHON = "python3"
DEFAULT_SSH_PORT = 22
LIST_NODES_HINT = "rbee-keeper setup list-nodes"


@dataclass(frozen=True, slots=True)
class SshSettings:
    """How the keeper reaches a node's sshd; `user`/`key` None mean asyncssh's defaults."""

    host: str
    port: int = DEFAULT_SSH_PORT
    user: str | None = None
    key: str | None = None

    @property
    def target(self) -> str:
        """`user@host:port` for messages."""
        who = f"{self.user}@" if self.user else ""
        return f"{who}{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Defaults:
    """The inventory's `defaults:` block: values every node inherits unless it says otherwise."""

    ssh_user: str | None = None
    ssh_port: int = DEFAULT_SSH_PORT
    ssh_key: str | None = None
    models_dir: str | None = None
    home: str = DEFAULT_HOME
    python: str = DEFAULT_PYTHON
    backends: tuple[str, ...] = ("cpu",)


@dataclass(frozen=True, slots=True)
class Node:
    """One machine (or one `$RBEE_HOME` on a machine) that runs a hive and its workers.

    `home` and `models_dir` are paths on the node and may start with `~/`, which
    means the node user's home directory, not the keeper's.
    """

    name: str
    transport: Transport
    address: str
    home: str = DEFAULT_HOME
    python: str = DEFAULT_PYTHON
    backends: tuple[str, ...] = ("cpu",)
    ssh: SshSettings | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    models_dir: str | None = None

    @property
    def is_local(self) -> bool:
        return self.transport == "local"

    @property
    def effective_models_dir(self) -> str:
        return self.models_dir or f"{self.home.rstrip('/')}/models"

    def describe(self) -> str:
        """`name (user@host:port)` or `name (local)` for messages."""
        where = self.ssh.target if self.ssh is not None else "local"
        return f"{self.name} ({where})"


@dataclass(frozen=True, slots=True)
class Inventory:
    """All nodes, in the order the file lists them (and the external engines the queen routes to)."""

    nodes: Mapping[str, Node]
    defaults: Defaults = field(default_factory=Defaults)
    path: Path | None = None
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    #: the `models:` block: placement and replicas per model name (absent: the defaults)
    models: Mapping[str, ModelPlacement] = field(default_factory=dict)

    def placement(self, model: str) -> ModelPlacement:
        return self.models.get(model) or ModelPlacement.default(model)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def names(self) -> list[str]:
        return list(self.nodes)

    def node(self, name: str) -> Node:
        """The node called `name`, or UNKNOWN_NODE naming the known ones and the likely typo."""
        try:
            return self.nodes[name]
        except KeyError:
            raise unknown_node(name, self.names()) from None

    def select(self, names: Iterable[str] | None = None) -> list[Node]:
        """The named nodes (all of them for None), each name checked."""
        if names is None:
            return list(self.nodes.values())
        return [self.node(name) for name in names]


def unknown_node(name: str, known: list[str]) -> RbeeError:
    listing = ", ".join(known) if known else "none"
    return RbeeError(
        ErrorCode.UNKNOWN_NODE,
        f"unknown node {name!r} (known: {listing}){did_you_mean(name, known)}",
        details={"node": name, "known": known},
        hint=LIST_NODES_HINT,
    )


def check_node_name(name: str) -> str:
    """Node names end up in paths, messages and argv; keep them boring."""
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"invalid node name {name!r}: use 1–64 letters, digits, '.', '_' or '-'",
            details={"node": name, "pattern": NODE_NAME_RE.pattern},
        )
    return name
