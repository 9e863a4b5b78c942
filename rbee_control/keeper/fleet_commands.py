"""`hive`, `models`, `worker` and `status`: one node or the whole fleet, concurrently."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from rbee_control.inventory.model import Inventory, Node
from rbee_control.node.client import STATUS_TIMEOUT, NodeClient
from rbee_control.node.split import check_split, describe, start_split
from rbee_control.ssh.transport import NodeTransport
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import DaemonInfo, WorkerInfo, check_worker_id
from rbee_worker.protocol.spawn import SpawnRequest, add_spawn_arguments

from .context import KeeperContext
from .display import Display, NodeProgress, human_bytes, table
from .provision import ensure_model

if TYPE_CHECKING:
    from rbee_control.ssh.pool import NodeOutcome

NodeAction = Callable[[NodeClient], Awaitable[Any]]


def _targets(inventory: Inventory, args: argparse.Namespace) -> list[Node]:
    if getattr(args, "all", False) or not getattr(args, "node", None):
        return list(inventory)
    return [inventory.node(args.node)]


async def fan_out(
    ctx: KeeperContext, nodes: list[Node], action: NodeAction, timeout: float = 120
) -> dict[str, NodeOutcome[Any]]:
    async with ctx.pool() as pool:

        async def run(transport: NodeTransport) -> Any:
            return await action(NodeClient(transport.node, transport))

        return await pool.fan_out(nodes, run, timeout=timeout)


def _public(value: Any) -> Any:
    """A node's answer as JSON, with workers' API keys left out: `--json` output is not a secret store."""

    def one(item: Any) -> Any:
        if isinstance(item, WorkerInfo):
            return item.public()
        if isinstance(item, dict):
            return {k: v for k, v in item.items() if k != "api_key"}
        if hasattr(item, "to_json"):
            return item.to_json()
        return item

    if isinstance(value, list):
        return [one(item) for item in value]
    if isinstance(value, dict) and isinstance(value.get("workers"), list):
        return {**value, "workers": [one(w) for w in value["workers"]]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return one(value) if hasattr(value, "to_json") else dataclasses.asdict(value)
    return value


def report_outcomes(
    display: Display,
    outcomes: dict[str, NodeOutcome[Any]],
    human: Callable[[str, Any], str] | None = None,
) -> int:
    """Each node's failure (cause, hint) or, with `human`, its success; one JSON result; the exit code."""
    for name, outcome in outcomes.items():
        if outcome.error is not None:
            display.node_error(name, outcome.error)
        elif human is not None:
            display.narrate(f"[green]{name}[/green]: {human(name, outcome.value)}")
    display.result(
        {
            name: {"error": o.error.body()["error"]} if o.error is not None else _public(o.value)
            for name, o in outcomes.items()
        }
    )
    return 0 if all(o.ok for o in outcomes.values()) else 1


# --- hive ----------------------------------------------------------------------------


async def cmd_hive(args: argparse.Namespace, ctx: KeeperContext) -> int:
    inventory = ctx.inventory
    action: NodeAction = {
        "start": lambda c: c.hive_start(),
        "stop": lambda c: c.hive_stop(),
        "status": lambda c: c.hive_status(),
        "detect": lambda c: c.call("detect", timeout=60),
    }[args.action]
    outcomes = await fan_out(ctx, _targets(inventory, args), action)
    if args.action == "detect":
        if not ctx.display.json_mode:
            ctx.display.out.print(_detect_table(outcomes))
        return report_outcomes(ctx.display, outcomes, _detect_notes)
    return report_outcomes(ctx.display, outcomes, lambda name, v: _hive_line(args.action, v))


def _detect_table(outcomes: dict[str, NodeOutcome[Any]]) -> Any:
    rows = [
        [
            name,
            f"{d['backend']}:{d['device']}",
            d.get("name"),
            human_bytes(d.get("memory_total_bytes")),
            human_bytes(d.get("memory_free_bytes")),
            ", ".join(o.value.get("llama_cpp_backends") or []) or "not installed",
        ]
        for name, o in outcomes.items()
        if o.ok and o.value is not None
        for d in o.value.get("devices", [])
    ]
    return table("devices", ["node", "device", "name", "total", "free", "llama-cpp-python built for"], rows)


def _detect_notes(name: str, info: dict[str, Any]) -> str:
    warnings = info.get("warnings") or []
    return "; ".join(warnings) if warnings else f"{len(info.get('devices', []))} device(s)"


def devices_cell(node_info: dict[str, Any]) -> str:
    """`cpu (2 cores) · cuda:0 23.3/24.0 GB`: each device with free/total memory (RAM has its own column)."""
    parts = []
    for d in node_info.get("devices") or []:
        if d.get("backend") == "cpu":
            parts.append(f"cpu ({d.get('name')})")
            continue
        free, total = human_bytes(d.get("memory_free_bytes")), human_bytes(d.get("memory_total_bytes"))
        parts.append(f"{d.get('backend')}:{d.get('device')} {free}/{total}")
    return " · ".join(parts) or "-"


def _hive_line(action: str, info: Any) -> str:
    """What `hive start|stop|status` did on one node, in words (not a bare "ok")."""
    if isinstance(info, DaemonInfo):
        return f"{info.status.replace('_', ' ')} (pid {info.pid})"
    if not isinstance(info, dict):
        return "ok"
    if action == "stop":
        if not info.get("stopped"):
            return "was not running"
        return f"stopped (pid {info.get('pid')}, {info.get('how')}, {info.get('workers_stopped', 0)} workers)"
    if not info.get("running"):
        return "not running"
    return f"running (pid {info.get('pid')}, {len(info.get('workers') or [])} workers)"


# --- models --------------------------------------------------------------------------


async def cmd_models(args: argparse.Namespace, ctx: KeeperContext) -> int:
    inventory, display = ctx.inventory, ctx.display
    if args.action == "list":
        outcomes = await fan_out(ctx, _targets(inventory, args), lambda c: c.models_list())
        rows = [
            [name, m.name, m.architecture, m.quantization, human_bytes(m.size)]
            for name, o in outcomes.items()
            if o.ok
            for m in o.value or []
        ]
        if not display.json_mode:
            display.out.print(table("models", ["node", "name", "architecture", "quant", "size"], rows))
        return report_outcomes(display, outcomes)
    node = _one_node(inventory, args)
    async with ctx.pool() as pool:
        client = NodeClient(node, await pool.get(node))
        if args.action == "add":
            with NodeProgress(display) as progress:
                entry = await ensure_model(
                    client, args.ref, progress, name=args.name, sha256=args.sha256, max_bytes=args.max_bytes
                )
            display.result(entry.to_json(), f"{node.name}: {entry.name} ready ({human_bytes(entry.size)})")
        else:
            removed = await client.models_rm(args.name)
            display.result(removed, f"{node.name}: removed {args.name}")
    return 0


def _one_node(inventory: Inventory, args: argparse.Namespace) -> Node:
    if not args.node:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "--node is required", hint="rbee-keeper setup list-nodes")
    return inventory.node(args.node)


# --- worker --------------------------------------------------------------------------


async def cmd_worker(args: argparse.Namespace, ctx: KeeperContext) -> int:
    if args.action == "stop":
        check_worker_id(args.id)  # before any connection: an id ends up in a URL path on the node
    inventory, display = ctx.inventory, ctx.display
    if args.action == "list":
        outcomes = await fan_out(ctx, _targets(inventory, args), lambda c: c.worker_list())
        rows = [
            [name, w.id, w.model, w.state, w.url, w.runtime]
            for name, o in outcomes.items()
            if o.ok
            for w in o.value or []
        ]
        if not display.json_mode:
            display.out.print(table("workers", ["node", "id", "model", "state", "url", "runtime"], rows))
        return report_outcomes(display, outcomes)
    node = _one_node(inventory, args)
    async with ctx.pool() as pool:
        client = NodeClient(node, await pool.get(node))
        if args.action == "spawn":
            req = SpawnRequest.from_args(args, wait=True)
            if args.split:
                helper_nodes = inventory.select(check_split(node.name, args.split))
                helpers = {h.name: NodeClient(h, await pool.get(h)) for h in helper_nodes}
                with display.err.status(
                    f"loading {args.model} on {node.name} split over {', '.join(helpers)}"
                ):
                    split = await start_split(node.name, client, helpers, req)
                spawned = split.worker
                where = f"{node.name} split over {' + '.join(split.nodes)}"
                payload = {
                    **spawned.public(),
                    "split": [{"node": n, **s.to_json()} for n, s in split.servers],
                }
                display.result(payload, f"{where}: worker {spawned.id} {spawned.state} at {spawned.url}")
                return 0
            await client.hive_start()
            with display.err.status(f"loading {args.model} on {node.name}"):
                spawned = await client.worker_spawn(req)
            display.result(
                spawned.public(), f"{node.name}: worker {spawned.id} {spawned.state} at {spawned.url}"
            )
        else:
            rpc = next((w.rpc_servers for w in await client.worker_list() if w.id == args.id), [])
            stopped = await client.worker_stop(args.id)
            if rpc:  # then its RPC servers, wherever they run (their hives would stop them soon anyway)
                await _stop_rpc_servers(ctx, inventory, pool, set(rpc))
            display.result(stopped.to_json(), f"{node.name}: stopped {args.id}")
    return 0


async def _stop_rpc_servers(ctx: KeeperContext, inventory: Inventory, pool: Any, endpoints: set[str]) -> None:
    async def one(n: Node) -> None:
        client = NodeClient(n, await pool.get(n))
        for server in await client.rpc_list():
            if server.endpoint in endpoints:
                await client.rpc_stop(server.id)

    await asyncio.gather(*(one(n) for n in inventory), return_exceptions=True)


# --- status --------------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace, ctx: KeeperContext) -> int:
    inventory, display = ctx.inventory, ctx.display
    wait = args.timeout
    outcomes = await fan_out(ctx, _targets(inventory, args), lambda c: c.hive_status(wait), timeout=60)
    rows = []
    rpc_owners = {  # endpoint → node, for split workers
        s.get("endpoint"): name
        for name, o in outcomes.items()
        if o.ok
        for s in (o.value or {}).get("rpc_servers", [])
    }
    for name, outcome in outcomes.items():
        if outcome.error is not None:
            silent = outcome.error.code == ErrorCode.REQUEST_TIMEOUT
            why = f"no answer in {wait:g}s" if silent else f"unreachable ({outcome.error.code})"
            rows.append([name, f"[red]{why}[/red]", "-", "-", "-", "-"])
            continue
        info = outcome.value or {}
        node_info = info.get("node", {})
        workers = info.get("workers", [])
        hive = "[green]running[/green]" if info.get("running") else "stopped"
        worker_text = ", ".join(_worker_cell(w, name, rpc_owners) for w in workers) or "-"
        ram = f"{human_bytes(node_info.get('ram_available'))} free"
        rows.append(
            [name, hive, worker_text, str(node_info.get("models", "-")), ram, devices_cell(node_info)]
        )
    if not display.json_mode:
        columns = ["node", "hive", "workers", "models", "RAM", "devices (free)"]
        display.out.print(table("rbee fleet", columns, rows))
        replicas = _replica_rows(inventory, outcomes)
        if replicas:
            display.out.print(table("replicas", ["model", "workers", "nodes", "min..max", "split"], replicas))
    return report_outcomes(display, outcomes)


def _replica_rows(inventory: Inventory, outcomes: dict[str, NodeOutcome[Any]]) -> list[list[str]]:
    """Per model: how many workers run where, against the inventory's `replicas` range."""
    where: dict[str, list[str]] = {}
    for name, outcome in outcomes.items():
        for worker in (outcome.value or {}).get("workers", []) if outcome.ok else []:
            where.setdefault(str(worker.get("model")), []).append(name)
    rows = []
    for model, nodes in sorted(where.items()):
        p = inventory.placement(model)
        split = ", ".join(p.split) or "-"
        rows.append([model, str(len(nodes)), ", ".join(nodes), f"{p.min_replicas}..{p.max_replicas}", split])
    return rows


def _worker_cell(worker: dict[str, Any], node: str, rpc_owners: dict[str, str]) -> str:
    cell = f"{worker.get('model')}:{worker.get('state')}"
    if worker.get("rpc_servers"):
        cell += f" (split {describe(worker, rpc_owners, node)})"
    return cell


async def _search(args: argparse.Namespace, ctx: KeeperContext) -> int:
    from .model_search import cmd_models_search

    return await cmd_models_search(args, ctx)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"seconds must be more than 0 and at most 3600, not {text}")
    return value


def register(sub: Any) -> None:
    def nodes(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--node")
        group.add_argument("--all", action="store_true")

    hive = sub.add_parser("hive", help="start, stop or inspect node daemons")
    hive.add_argument("action", choices=["start", "stop", "status", "detect"])
    nodes(hive)
    hive.set_defaults(handler=cmd_hive)

    models = sub.add_parser("models", help="model catalogs of the nodes")
    msub = models.add_subparsers(dest="action", required=True)
    p = msub.add_parser("add", help="provision a model on a node (file: refs are pushed over SFTP)")
    p.add_argument("ref")
    p.add_argument("--node", required=True)
    p.add_argument("--name")
    p.add_argument("--sha256", help="expected sha256 (required for http:// URLs)")
    p.add_argument("--max-bytes", type=int, help="refuse a download larger than this (node default 256 GiB)")
    p = msub.add_parser("list")
    nodes(p)
    p = msub.add_parser("search", help="a Hugging Face repo's quantizations and sizes (asked from here)")
    p.add_argument("ref", help="hf:owner/repo")
    p.set_defaults(handler=_search)
    p = msub.add_parser("rm")
    p.add_argument("name")
    p.add_argument("--node", required=True)
    models.set_defaults(handler=cmd_models)

    worker = sub.add_parser("worker", help="model workers on the nodes")
    wsub = worker.add_subparsers(dest="action", required=True)
    p = wsub.add_parser("spawn")
    p.add_argument("--node", required=True)
    p.add_argument(
        "--split",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        help="B,C: place the model's layers on RPC servers of these nodes too (trusted LAN only: no auth)",
    )
    add_spawn_arguments(p, wait=False)  # the keeper always waits for the model to load
    p = wsub.add_parser("list")
    nodes(p)
    p = wsub.add_parser("stop")
    p.add_argument("id")
    p.add_argument("--node", required=True)
    worker.set_defaults(handler=cmd_worker)

    status = sub.add_parser("status", help="one table of every node: hive, workers, models")
    nodes(status)
    status.add_argument(
        "--timeout",
        type=positive_seconds,
        default=STATUS_TIMEOUT,
        help=f"seconds a running hive may take to answer before it shows as silent ({STATUS_TIMEOUT:g})",
    )
    status.set_defaults(handler=cmd_status)
