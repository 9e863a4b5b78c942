"""argv for rbee's own programs on a node: `<home>/venv/bin/rbee-hive --home <home> …`.

`setup install` puts a venv at `<home>/venv`; every other command runs the
programs from there, with `RBEE_HOME` set too, so several nodes can share one
machine without touching each other's state. A local node whose home has no
venv runs the programs installed next to the keeper's own Python instead, so
`transport: local` works straight after `pip install rbee`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rbee_control.inventory.model import Node
from rbee_control.ssh.command import NodePath
from rbee_worker.protocol.errors import ErrorCode, RbeeError

PROGRAMS: dict[str, str] = {"hive": "rbee-hive", "worker": "rbee-worker"}
HOME_ENV = "RBEE_HOME"
#: the inventory's `models_dir`, read by `rbee-hive` (same name as `rbee_control.hive.paths`)
MODELS_DIR_ENV = "RBEE_MODELS_DIR"


def node_home(node: Node) -> NodePath:
    return NodePath(node.home)


def venv_dir(node: Node) -> NodePath:
    return node_home(node).joinpath("venv")


def venv_bin(node: Node, executable: str) -> NodePath:
    """`<home>/venv/bin/<executable>` on the node."""
    return venv_dir(node).joinpath("bin", executable)


def program_path(node: Node, program: str) -> str:
    """Where `program` ("hive", "worker") lives on the node."""
    try:
        executable = PROGRAMS[program]
    except KeyError:
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"unknown rbee program {program!r}") from None
    in_venv = venv_bin(node, executable)
    if node.is_local and not Path(in_venv.local()).exists():
        beside_keeper = Path(sys.executable).parent / executable
        if beside_keeper.exists():
            return str(beside_keeper)
    return in_venv


def node_command(node: Node, program: str, *args: str) -> list[str]:
    """argv running an rbee program on `node`; the hive also gets `--home <home>`."""
    argv: list[str] = [program_path(node, program)]
    if program == "hive":
        argv += ["--home", node_home(node)]
    return [*argv, *args]


def hive_command(node: Node, *args: str) -> list[str]:
    """`node_command(node, "hive", *args)`."""
    return node_command(node, "hive", *args)


def node_env(node: Node, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for rbee programs on `node` (pass as `env=` to run/stream)."""
    env: dict[str, str] = {HOME_ENV: node_home(node)}
    if node.models_dir:
        env[MODELS_DIR_ENV] = NodePath(node.models_dir)
    return {**env, **(extra or {})}
