"""`rbee-keeper logs --node NAME [--worker ID | --hive] [--follow] [--lines N]`: a node's logs over SSH.

Runs `rbee-hive logs` on the node and copies its lines to stdout; `--follow` keeps
streaming until Ctrl-C, which closes the remote command with the connection.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rbee_control.ssh.node_command import hive_command, node_env
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import check_worker_id
from rbee_worker.protocol.node_events import parse_line

from .context import KeeperContext


async def cmd_logs(args: argparse.Namespace, ctx: KeeperContext) -> int:
    if args.worker is not None:
        check_worker_id(args.worker)  # before any connection: the id becomes a file name on the node
    if args.lines < 0:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "--lines must be 0 or more")
    node = ctx.inventory.node(args.node)
    argv = ["--json", "logs", "--lines", str(args.lines)]
    if args.worker:
        argv += ["--worker", args.worker]
    if args.follow:
        argv.append("--follow")
    async with ctx.pool() as pool:
        transport = await pool.get(node)
        async with transport.stream(hive_command(node, *argv), env=node_env(node)) as proc:
            async for line in proc:
                if line.startswith('{"event"'):
                    try:
                        event = parse_line(line)
                    except ValueError:
                        pass
                    else:
                        if event.event == "error":
                            raise event.to_error()
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            status = await proc.wait()
    if not status.ok:
        raise RbeeError(
            ErrorCode.INTERNAL_ERROR,
            f"rbee-hive logs failed on {node.name} (exit {status.exit_status})",
            details={"stderr": status.stderr.strip()[-300:]},
            hint=f"rbee-keeper setup install --node {node.name}",
        )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("logs", help="a node's hive or worker log, over SSH (--follow to keep reading)")
    p.add_argument("--node", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--worker", metavar="ID", help="this worker's log (worker list shows the ids)")
    which.add_argument("--hive", action="store_true", help="the hive's log (the default)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C")
    p.add_argument(
        "--lines", "-n", type=int, default=50, help="how many of the last lines first (default 50)"
    )
    p.set_defaults(handler=cmd_logs)
