"""`setup upgrade` and `setup uninstall`: a node's rbee after it was installed.

An upgrade installs this keeper's build into a new venv (see `install`), restarts
the hive from it and spawns again the workers that ran (same model, runtime,
backend, device, slots); the catalog and the model files stay where they are, in
the home, untouched. Uninstall stops the hive, removes the boot service and the
venvs, and keeps the models and the catalog unless `--purge`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from rbee_control.inventory.model import Node
from rbee_control.node.client import NodeClient
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import WorkerInfo
from rbee_worker.protocol.spawn import SpawnRequest

from .context import KeeperContext
from .display import NodeProgress
from .fleet_commands import report_outcomes
from .install import InstallOptions, NodeInstall, build_wheel, install_llama_on, offline_env
from .service import remove_service

#: what `uninstall` removes from the home without `--purge` (models/, models.db, tls/, logs/ stay)
PROGRAM_FILES = ("venv", "venv.new", "venvs", "incoming", "llama-build.json")


async def _running_workers(client: NodeClient) -> tuple[bool, list[WorkerInfo]]:
    """(hive running, its ready workers), read with whatever rbee the node has now."""
    try:
        status = await client.call("status", timeout=30)
        workers = await client.worker_list() if status.get("running") else []
    except RbeeError as exc:
        if exc.code in (ErrorCode.HIVE_NOT_RUNNING, ErrorCode.VERSION_MISMATCH):
            return False, []
        raise
    return bool(status.get("running")), [w for w in workers if w.state != "draining"]


async def _has_llama(transport: Any, home: str) -> bool:
    found = await transport.run([f"{home}/venv/bin/python", "-c", "import llama_cpp"], timeout=60)
    return bool(found.ok)


async def upgrade_node(
    transport: Any, wheel: Path, options: InstallOptions, progress: NodeProgress, ctx: KeeperContext
) -> dict[str, Any]:
    node: Node = transport.node
    old = NodeClient(node, transport, same_version=False)  # the hive there now, whatever its release
    client = NodeClient(node, transport)
    step = NodeInstall(node, transport, progress, ctx.display)
    home = await step.home()
    before = await transport.run([f"{home}/venv/bin/rbee-hive", "--version"], timeout=60)
    running, workers = await _running_workers(old)
    llama = await _has_llama(transport, home)
    if running:
        step.step(f"stopping the hive ({len(workers)} worker(s) to bring back)")
        await old.call("stop", timeout=90)
    extras = ",".join(e for e in (options.extras, "llama" if llama else None) if e) or None
    done = await step.install(wheel, InstallOptions(extras, options.backend, options.offline))
    done["before"] = before.stdout.strip() if before.ok else None
    if llama:
        done["llama"] = await install_llama_on(client, options.backend, ctx.display, offline_env(done))
    restored = []
    if running:
        step.step("starting the hive from the new venv")
        await client.hive_start()
        for worker in workers:
            step.step(f"spawning a worker for {worker.model} again")
            request = SpawnRequest(
                model=worker.model,
                runtime=worker.runtime or "auto",
                backend=worker.backend or "auto",
                device=worker.device,
                slots=worker.slots,
                wait=True,
            )
            info = await client.worker_spawn(request, progress=progress.on_event(node.name))
            restored.append({"model": info.model, "id": info.id, "was": worker.id})
    done["workers"] = restored
    return done


async def cmd_upgrade(args: argparse.Namespace, ctx: KeeperContext) -> int:
    inventory, display = ctx.inventory, ctx.display
    nodes = list(inventory) if args.all else [inventory.node(args.node)]
    options = InstallOptions(args.extras, args.backend, args.offline)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = await build_wheel(Path(tmp))
        display.narrate(f"[dim]built {wheel.name}[/dim]")
        with NodeProgress(display) as progress:
            async with ctx.pool() as pool:

                async def one(transport: Any) -> dict:
                    return await upgrade_node(transport, wheel, options, progress, ctx)

                outcomes = await pool.fan_out(nodes, one, timeout=3600)
    return report_outcomes(display, outcomes, _upgraded_line)


def _upgraded_line(name: str, value: dict[str, Any]) -> str:
    before = value.get("before") or "nothing"
    workers = value.get("workers") or []
    back = f"; {len(workers)} worker(s) back: " + ", ".join(w["model"] for w in workers) if workers else ""
    return f"{before} → {value['version']}{back}"


async def uninstall_node(transport: Any, purge: bool, progress: NodeProgress, ctx: KeeperContext) -> dict:
    node: Node = transport.node
    step = NodeInstall(node, transport, progress, ctx.display)
    home = await step.home()
    facts = await step.facts(home)
    if home.rstrip("/") in ("", facts.home_dir.rstrip("/")) or home.count("/") < 2:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"refusing to remove {home!r} on {node.name}: the home must be a directory of its own",
            hint=f"set `home:` of node {node.name} in the inventory to rbee's own directory",
        )
    client = NodeClient(node, transport, same_version=False)
    try:
        await client.call("stop", timeout=90)
    except RbeeError as exc:
        if exc.code != ErrorCode.HIVE_NOT_RUNNING:
            raise
    service = await remove_service(node, transport, home)
    targets = [home] if purge else [f"{home}/{name}" for name in PROGRAM_FILES]
    step.step(f"removing {', '.join(targets)}")
    removed = await transport.run(["rm", "-rf", *targets], timeout=600)
    if not removed.ok:
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"removing rbee from {node.name} failed: {removed.stderr}")
    kept = [] if purge else [f"{home}/models", f"{home}/models.db"]
    if node.models_dir:
        kept.append(node.models_dir)
    return {"removed": targets, "service": service, "kept": kept}


async def cmd_uninstall(args: argparse.Namespace, ctx: KeeperContext) -> int:
    inventory, display = ctx.inventory, ctx.display
    nodes = list(inventory) if args.all else [inventory.node(args.node)]
    with NodeProgress(display) as progress:
        async with ctx.pool() as pool:

            async def one(transport: Any) -> dict:
                return await uninstall_node(transport, args.purge, progress, ctx)

            outcomes = await pool.fan_out(nodes, one, timeout=900)

    def line(name: str, value: dict[str, Any]) -> str:
        kept = f"; kept {', '.join(value['kept'])}" if value["kept"] else ""
        return "rbee removed" + kept

    return report_outcomes(display, outcomes, line)


def register(ssub: Any) -> None:
    p = ssub.add_parser("upgrade", help="install this keeper's rbee; restart the hive and its workers")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--node")
    group.add_argument("--all", action="store_true")
    p.add_argument("--extras", help="extras to add (llama is kept when the node had it)")
    p.add_argument("--backend", choices=["auto", "cpu", "cuda", "metal"], default="auto")
    p.add_argument("--offline", action="store_true", help="as for install: wheels gathered here and pushed")
    p.set_defaults(handler=cmd_upgrade)
    p = ssub.add_parser("uninstall", help="stop the hive and remove rbee from the node (models kept)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--node")
    group.add_argument("--all", action="store_true")
    p.add_argument("--purge", action="store_true", help="remove the whole home: models and catalog too")
    p.set_defaults(handler=cmd_uninstall)
