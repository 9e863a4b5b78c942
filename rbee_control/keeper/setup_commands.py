"""`setup add-node | list-nodes | remove-node | install`: putting machines into the fleet.

`upgrade` and `uninstall` live in `lifecycle`, the boot service in `service`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rbee_control.inventory.editor import add_node, remove_node
from rbee_control.inventory.first import create_first_inventory, inventory_to_edit
from rbee_control.inventory.loader import load_inventory
from rbee_control.inventory.model import Node, SshSettings, check_node_name
from rbee_control.inventory.paths import known_hosts_path
from rbee_control.ssh.node_command import hive_command, node_env
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from . import lifecycle
from .context import KeeperContext
from .display import Display, table
from .fleet_commands import report_outcomes
from .install import InstallOptions, install_nodes

# --- add-node ------------------------------------------------------------------------


async def cmd_add_node(args: argparse.Namespace, ctx: KeeperContext) -> int:
    from rbee_control.ssh.known_hosts import KnownHosts, fetch_host_key, fingerprint
    from rbee_control.ssh.remote import SshTransport

    display = ctx.display
    path = inventory_to_edit(ctx.inventory_arg)
    _check_new_node(path, args.name)
    ssh = SshSettings(host=args.ssh_host, port=args.ssh_port, user=args.ssh_user, key=args.ssh_key)
    known = KnownHosts(known_hosts_path())
    node = Node(
        name=args.name,
        transport="ssh",
        address=args.address or args.ssh_host,
        home=args.home or "~/.local/share/rbee",
        python=args.python or "python3",
        backends=("cpu",),
        ssh=ssh,
        labels={},
        models_dir=None,
    )

    def check(label: str, detail: str = "OK") -> None:
        display.narrate(f"[green]✓[/green] {label}: {detail}")

    expected = _check_fingerprint(args.fingerprint) if args.fingerprint else None
    key = await fetch_host_key(args.ssh_host, args.ssh_port, timeout=10)
    check("connection reachable", f"{args.ssh_host}:{args.ssh_port}")
    print_fp = fingerprint(key)
    target = f"{args.ssh_host}:{args.ssh_port}"
    if expected is not None and print_fp != expected:
        raise RbeeError(
            ErrorCode.HOST_KEY_UNKNOWN,
            f"{target} offered host key {print_fp}, not the expected {expected}; refusing to connect",
            details={"fingerprint": print_fp, "expected": expected},
            hint="read the fingerprint on the node itself: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub",
        )
    pinned = known.lookup(args.ssh_host, args.ssh_port)
    if pinned and not known.is_trusted(args.ssh_host, args.ssh_port, key):
        raise RbeeError(
            ErrorCode.HOST_KEY_CHANGED,
            f"the host key of {target} changed (now {print_fp}); refusing to connect",
            hint=f"if the machine was reinstalled: remove its key from {known.path}, then add the node again",
        )
    if not pinned:
        verified = expected is not None
        if not (verified or args.trust) and not _confirm(display, f"trust host key {print_fp} of {target}?"):
            raise RbeeError(
                ErrorCode.HOST_KEY_UNKNOWN,
                f"host key {print_fp} of {target} is not trusted (check it on the node, then pass "
                f"--fingerprint {print_fp}, or --trust to pin it as offered)",
                details={"fingerprint": print_fp},
                hint=_add_node_command(args) + " --trust",
            )
        known.trust(args.ssh_host, args.ssh_port, key)
        how = "matches --fingerprint" if verified else "trusted as offered: compare it with the node's own"
        check("host key pinned", f"{print_fp} ({how})")
    async with SshTransport(node, known_hosts=known) as transport:
        check("key authentication", f"{ssh.user or 'default user'}")
        started = time.perf_counter()
        echo = await transport.run(["echo", "test"], timeout=10)
        latency_ms = (time.perf_counter() - started) * 1000
        if echo.stdout.strip() != "test":
            raise RbeeError(
                ErrorCode.CONNECTION_FAILED, f"command execution failed on {args.name}: {echo.stderr}"
            )
        check("command execution", "echo test")
        check("latency", f"{latency_ms:.0f} ms")
        hive = await transport.run(hive_command(node, "--version"), env=node_env(node), timeout=30)
        installed = hive.ok
        if installed:
            check("rbee-hive found", hive.stdout.strip())
        else:
            display.narrate(
                f"[yellow]![/yellow] rbee-hive not installed: rbee-keeper setup install --node {args.name}"
            )
    fields: dict[str, Any] = {
        "ssh": {"host": args.ssh_host, "port": args.ssh_port, "user": args.ssh_user, "key": args.ssh_key},
        "address": args.address,
        "home": args.home,
        "python": args.python,
    }
    if create_first_inventory(path):
        display.narrate(f"[green]✓[/green] created the inventory {path} (with the node local)")
    add_node(path, args.name, fields)
    display.result(
        {
            "node": args.name,
            "fingerprint": print_fp,
            "latency_ms": round(latency_ms, 1),
            "installed": installed,
        },
        f"added node {args.name} to {path}",
    )
    return 0


_FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}=?")


def _check_fingerprint(value: str) -> str:
    """`SHA256:<43 base64 chars>` as `ssh-keygen -lf` prints it (a trailing `=` is dropped)."""
    if not _FINGERPRINT_RE.fullmatch(value):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"--fingerprint {value!r} is not a SHA256 host key fingerprint",
            status=400,
            hint="on the node: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub (the SHA256:… part)",
        )
    return value.rstrip("=")


def _check_new_node(path: Path, name: str) -> None:
    """Refuse a bad or taken name before touching the network or known_hosts."""
    check_node_name(name)
    taken = load_inventory(path).names() if path.exists() else ["local"]
    if name in taken:
        where = f"exists in {path}" if path.exists() else f"is this machine in the new inventory {path}"
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"node {name!r} already {where}",
            status=409,
            details={"node": name},
            hint=f"to replace it: rbee-keeper setup remove-node {name}, then add it again",
        )


def _add_node_command(args: argparse.Namespace) -> str:
    """The add-node command line the operator gave, quoted, to repeat with `--trust`."""
    words = ["rbee-keeper", "setup", "add-node", args.name, "--ssh-host", args.ssh_host]
    words += ["--ssh-port", str(args.ssh_port)]
    for option in ("ssh_user", "ssh_key", "address", "home", "python"):
        value = getattr(args, option)
        if value:
            words += [f"--{option.replace('_', '-')}", value]
    if args.inventory:
        words[1:1] = ["--inventory", args.inventory]
    return shlex.join(words)


def _confirm(display: Display, question: str) -> bool:
    if display.json_mode or not sys.stdin.isatty():
        return False
    display.err.print(f"{question} [y/N] ", end="")
    return sys.stdin.readline().strip().lower() in ("y", "yes")


# --- list-nodes / remove-node ---------------------------------------------------------


async def cmd_list_nodes(args: argparse.Namespace, ctx: KeeperContext) -> int:
    inventory, display = ctx.inventory, ctx.display
    columns = ["name", "transport", "ssh", "address", "home", "backends"]
    rows = [
        [n.name, n.transport, n.ssh.target if n.ssh else "-", n.address, n.home, ",".join(n.backends)]
        for n in inventory
    ]
    if not display.json_mode:
        display.out.print(table(str(inventory.path), columns, rows))
    display.result({"nodes": [dict(zip(columns, r, strict=True)) for r in rows]})
    return 0


async def cmd_remove_node(args: argparse.Namespace, ctx: KeeperContext) -> int:
    path = ctx.inventory_path
    remove_node(path, args.name)
    ctx.display.result({"removed": args.name}, f"removed node {args.name} from {path}")
    return 0


# --- install -------------------------------------------------------------------------


async def cmd_install(args: argparse.Namespace, ctx: KeeperContext) -> int:
    inventory, display = ctx.inventory, ctx.display
    nodes = list(inventory) if args.all else [inventory.node(args.node)]
    options = InstallOptions(args.extras, args.backend, args.offline)
    outcomes = await install_nodes(ctx, nodes, options, service=args.service)
    return report_outcomes(display, outcomes, _installed_line)


def _installed_line(name: str, value: dict[str, Any]) -> str:
    line = str(value["version"]) + (" (offline)" if value.get("offline") else "")
    llama = value.get("llama")
    if llama:
        build = (
            f"llama-cpp-python {llama.get('version')} for {llama.get('backend')} ({llama.get('cmake_args')})"
        )
        line += f", {build}"
    if value.get("service"):
        line += f", service {value['service']['path']}"
    return line


def register(sub: Any) -> None:
    setup = sub.add_parser("setup", help="add, list, remove and install nodes")
    ssub = setup.add_subparsers(dest="action", required=True)
    p = ssub.add_parser("add-node", help="test the connection, pin the host key, record the node")
    p.add_argument("name")
    p.add_argument("--ssh-host", required=True)
    p.add_argument("--ssh-port", type=int, default=22)
    p.add_argument("--ssh-user")
    p.add_argument("--ssh-key")
    p.add_argument("--address", help="where its workers are reachable over HTTP (default: --ssh-host)")
    p.add_argument("--home", help="$RBEE_HOME on the node (default ~/.local/share/rbee)")
    p.add_argument("--python", help="python on the node for its venv (default python3)")
    p.add_argument(
        "--fingerprint",
        metavar="SHA256:…",
        help="the host key fingerprint to expect (read on the node): pinned without asking, else refused",
    )
    p.add_argument(
        "--trust", action="store_true", help="pin whatever host key is offered, without asking (prints it)"
    )
    p.set_defaults(handler=cmd_add_node)
    p = ssub.add_parser("list-nodes")
    p.set_defaults(handler=cmd_list_nodes)
    p = ssub.add_parser("remove-node")
    p.add_argument("name")
    p.set_defaults(handler=cmd_remove_node)
    p = ssub.add_parser("install", help="install rbee into a venv on the node (wheel pushed over SFTP)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--node")
    group.add_argument("--all", action="store_true")
    p.add_argument("--extras", help="e.g. llama (llama-cpp-python, built on the node for its accelerator)")
    p.add_argument(
        "--backend",
        choices=["auto", "cpu", "cuda", "metal"],
        default="auto",
        help="with --extras llama: the build (default: what rbee-hive detect finds on the node)",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="no package index on the node: wheels are gathered here and pushed (automatic without one)",
    )
    p.add_argument(
        "--service", action="store_true", help="start the hive at boot (systemd user unit / launchd agent)"
    )
    p.set_defaults(handler=cmd_install)
    lifecycle.register(ssub)
