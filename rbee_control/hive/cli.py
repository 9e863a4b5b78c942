"""`rbee-hive`: the node-side commands the keeper runs over SSH (or as a local subprocess).

Every subcommand is non-interactive, takes `--home` and `--json`, and ends with
exactly one `result` or `error` event (exit 0 / 1; 2 for usage errors). `models`
commands work without the daemon; `worker` commands need it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import KEEPER_VERSION_ENV, WorkerInfo
from rbee_worker.protocol.node_events import NODE_PLACEHOLDER, Emitter
from rbee_worker.protocol.spawn import DEVICE_BACKENDS, SpawnRequest, add_spawn_arguments

from . import __version__
from .config import HiveConfig
from .paths import HivePaths, check_worker_id

# Handlers import what they use: `models list` over SSH should not pay for uvicorn.


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return ""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    )


# --- handlers: (args, paths, emitter) -> None, ending in emitter.result -------


def cmd_daemon(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from . import daemon

    def report(info: dict[str, Any]) -> None:
        status = info["status"].replace("_", " ")
        out.result(info, f"hive {status} (pid {info['pid']}, socket {info['socket']})")

    config = HiveConfig.from_sources(**{f.name: getattr(args, f.name, None) for f in fields(HiveConfig)})
    if args.detach:
        report(daemon.detach(paths, config))
    else:
        daemon.run_daemon(paths, config, on_serving=report)


def cmd_status(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from .status import hive_status

    info = asyncio.run(hive_status(paths))
    node = info["node"]
    state = f"running, pid {info['pid']}" if info["running"] else "not running"
    backends = ", ".join(node["backends"]) or "none"
    lines = [
        f"hive: {state} ({info['home']})",
        f"node: {node['hostname']}, {node['cpus']} cpus, {_mb(node['ram_available'])} of "
        f"{_mb(node['ram_total'])} RAM free, {_mb(node['disk_free'])} disk free, backends {backends}",
        f"models: {node['models']}, workers: {len(info['workers'])}",
    ]
    gpus = [d for d in node.get("devices", []) if d["backend"] != "cpu"]
    lines += [
        f"{d['backend']}:{d['device']}: {d['name']}, {_mb(d['memory_free_bytes'])} of "
        f"{_mb(d['memory_total_bytes'])} free"
        for d in gpus
    ]
    out.result(info, "\n".join(lines))


def cmd_tls(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from . import tls

    paths.ensure()
    cert = tls.ensure_certificate(paths.tls_dir)  # the daemon's, as it is: its names are the daemon's choice
    out.result(cert.to_json(), f"{cert.fingerprint}\n{cert.cert}")


def cmd_stop(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from . import daemon

    info = asyncio.run(daemon.stop_hive(paths, grace=args.timeout))
    text = f"hive stopped (pid {info['pid']}, {info['how']})" if info["stopped"] else "hive was not running"
    if info["orphans_stopped"]:
        text += f"; stopped {info['orphans_stopped']} leftover workers"
    out.result(info, text)


def cmd_models_add(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from . import models

    row = asyncio.run(
        models.add_model(paths, args.ref, out, name=args.name, sha256=args.sha256, max_bytes=args.max_bytes)
    )
    state = "already in the catalog" if row["cached"] else "added"
    out.result(
        row, f"{row['name']}: {state} ({row['architecture']} {row['quantization']}, {_mb(row['size'])})"
    )


def cmd_models_list(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from . import models

    rows = models.list_models(paths)
    table = _table(
        [[r.name, r.architecture, r.quantization or "", _mb(r.size), r.ref] for r in rows],
        ["NAME", "ARCH", "QUANT", "SIZE", "REF"],
    )
    out.result({"models": [r.to_json(with_template=args.templates) for r in rows]}, table or "no models")


def cmd_models_rm(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from . import models
    from .pidfiles import running_hive

    if not args.force and running_hive(paths) is not None:
        using = [
            w.id for w in asyncio.run(_with_hive(paths, lambda h: h.list_workers())) if w.model == args.name
        ]
        if using:
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                f"model {args.name!r} is in use by {', '.join(using)}",
                status=409,
                details={"name": args.name, "workers": using},
                hint=f"rbee-hive worker stop {using[0]} (or models rm --force)",
            )
    info = models.remove_model(paths, args.name)
    out.result(info, f"{info['name']}: removed ({_mb(info['freed_bytes'])} freed)")


def cmd_models_verify(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from . import models

    info = asyncio.run(models.verify_model(paths, args.name, out))
    out.result(info, f"{info['name']}: ok (sha256 {info['sha256']})")


async def _with_hive(paths: HivePaths, call: Callable[[Any], Any]) -> Any:
    from .client import HiveClient

    async with HiveClient(paths) as hive:
        return await call(hive)


def cmd_worker_spawn(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    req = SpawnRequest.from_args(args)
    info = asyncio.run(_with_hive(paths, lambda h: h.spawn(req)))
    out.result(
        info.to_json(),
        f"{info.id}: {info.state} at {info.url} (pid {info.pid}, {info.runtime} on {_where(info)})\n"
        f"api key: {info.api_key}",
    )


def cmd_worker_list(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    workers = asyncio.run(_with_hive(paths, lambda h: h.list_workers()))
    table = _table(
        [[w.id, w.state, w.model, w.runtime or "", _where(w), w.url, str(w.pid)] for w in workers],
        ["ID", "STATE", "MODEL", "RUNTIME", "BACKEND", "URL", "PID"],
    )
    out.result({"workers": [w.to_json() for w in workers]}, table or "no workers")


def _where(w: WorkerInfo) -> str:
    return str(w.backend) + ("" if w.device is None else f":{w.device}")


def cmd_detect(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from .devices import detect

    info = detect(paths, timeout=args.timeout)
    rows = [
        [f"{d.backend}:{d.device}", d.name, _mb(d.memory_total_bytes), _mb(d.memory_free_bytes)]
        for d in info.devices
    ]
    lines = [_table(rows, ["DEVICE", "NAME", "TOTAL", "FREE"])]
    built = ", ".join(info.llama_cpp_backends) or "not installed"
    lines.append(f"llama-cpp-python built for: {built}")
    lines += [f"warning: {w}" for w in info.warnings]
    out.result(info.to_json(), "\n".join(lines))


def cmd_install_llama(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from .llama_install import install_llama

    paths.ensure()
    info = install_llama(paths, args.backend, out, dry_run=args.dry_run)
    verb = "would build" if info.get("dry_run") else "installed"
    if info.get("already_installed"):
        verb = "already installed"
    out.result(
        info, f"llama-cpp-python {info['version']} for {info['backend']}: {verb} ({info['cmake_args']})"
    )


def cmd_worker_stop(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    check_worker_id(args.id)
    info = asyncio.run(_with_hive(paths, lambda h: h.stop_worker(args.id)))
    out.result(info.to_json(), f"{info.id}: stopped ({info.how})")


def cmd_rpc_start(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    info = asyncio.run(_with_hive(paths, lambda h: h.rpc_start(args.threads)))
    out.result(
        info.to_json(),
        f"{info.id}: ggml-rpc-server on {info.endpoint} (pid {info.pid}, protocol {info.version})",
    )


def cmd_rpc_list(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    servers = asyncio.run(_with_hive(paths, lambda h: h.rpc_list()))
    table = _table(
        [[s.id, s.endpoint, str(s.pid), s.version, str(s.clients)] for s in servers],
        ["ID", "ENDPOINT", "PID", "PROTOCOL", "CLIENTS"],
    )
    out.result({"servers": [s.to_json() for s in servers]}, table or "no rpc servers")


def cmd_rpc_stop(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    info = asyncio.run(_with_hive(paths, lambda h: h.rpc_stop(args.id)))
    out.result(info.to_json(), f"{info.id}: stopped ({info.how})")


# --- parser ------------------------------------------------------------------


def cmd_logs(args: argparse.Namespace, paths: HivePaths, out: Emitter) -> None:
    from .logs import print_logs

    print_logs(paths, args.worker, args.lines, args.follow)
    out.finished = True  # the lines are the answer: no result event after them


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """`--home` and `--json` work before or after the subcommand."""
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--home", default=default, help="node state dir (default $RBEE_HOME or ~/.local/share/rbee)"
    )
    parser.add_argument(
        "--models-dir",
        default=default,
        help="where model files go (default $RBEE_MODELS_DIR or <home>/models)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="JSON lines on stdout (progress events, then one result or error)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbee-hive", description="rbee node daemon and node commands")
    parser.add_argument("--version", action="version", version=f"rbee-hive {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(group: Any, name: str, handler: Callable[..., None], help_text: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help_text, description=help_text)
        _common(p, top=False)
        p.set_defaults(handler=handler)
        return p

    p = leaf(sub, "daemon", cmd_daemon, "run the node daemon (idempotent)")
    p.add_argument("--detach", action="store_true", help="start in the background; return once it answers")
    for f in fields(HiveConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=type(f.default),
            default=None,
            metavar=type(f.default).__name__.upper(),
            help=f"default {f.default!r} (env RBEE_HIVE_{f.name.upper()})",
        )
    leaf(sub, "status", cmd_status, "is the daemon up; node facts; workers")
    p = leaf(sub, "detect", cmd_detect, "this node's devices (cpu, cuda, metal) and llama-cpp-python's build")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds each probe (nvidia-smi, sysctl) may take"
    )
    p = leaf(sub, "install-llama", cmd_install_llama, "build llama-cpp-python for this node's accelerator")
    p.add_argument("--backend", choices=["auto", *DEVICE_BACKENDS], default="auto", help="force a build")
    p.add_argument("--dry-run", action="store_true", help="say which build and command, install nothing")
    leaf(sub, "tls", cmd_tls, "the certificate workers beyond loopback serve HTTPS with (made if missing)")
    p = leaf(sub, "stop", cmd_stop, "stop the daemon and every worker (cascading)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for the daemon to stop before SIGTERM"
    )

    p = leaf(sub, "logs", cmd_logs, "print the hive's or a worker's log (plain lines, also with --json)")
    p.add_argument("--worker", metavar="ID", help="a worker's log instead of the hive's")
    p.add_argument("--lines", type=int, default=50, help="how many of the last lines (default 50)")
    p.add_argument("--follow", action="store_true", help="then print new lines as they come, until stopped")

    models_p = sub.add_parser("models", help="the node's model catalog (no daemon needed)")
    msub = models_p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = leaf(msub, "add", cmd_models_add, "download or import a GGUF model into the catalog")
    p.add_argument("ref", help="hf:owner/repo[:file.gguf] | https://…/file.gguf | file:/abs/path.gguf")
    p.add_argument("--name", help="catalog name (default: the file name without .gguf)")
    p.add_argument("--sha256", help="expected sha256 of the file (required for http:// URLs)")
    p.add_argument(
        "--max-bytes",
        type=int,
        help="refuse a download larger than this (default $RBEE_HIVE_MAX_MODEL_BYTES or 256 GiB)",
    )
    p = leaf(msub, "list", cmd_models_list, "list catalogued models")
    p.add_argument("--templates", action="store_true", help="include each model's chat template")
    p = leaf(msub, "rm", cmd_models_rm, "remove a model and its file")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="even if a worker is serving it")
    p = leaf(msub, "verify", cmd_models_verify, "re-hash and re-parse a catalogued model")
    p.add_argument("name")

    worker_p = sub.add_parser("worker", help="model workers (needs the daemon)")
    wsub = worker_p.add_subparsers(dest="worker_command", required=True, metavar="ACTION")
    p = leaf(wsub, "spawn", cmd_worker_spawn, "start a worker for a catalogued model")
    add_spawn_arguments(p)
    leaf(wsub, "list", cmd_worker_list, "list this node's workers")
    p = leaf(wsub, "stop", cmd_worker_stop, "stop one worker gracefully")
    p.add_argument("id")

    rpc_p = sub.add_parser("rpc", help="llama.cpp RPC servers for split workers (needs the daemon)")
    rsub = rpc_p.add_subparsers(dest="rpc_command", required=True, metavar="ACTION")
    p = leaf(
        rsub, "start", cmd_rpc_start, "start a ggml-rpc-server on this node's address (no auth: LAN only)"
    )
    p.add_argument("--threads", type=int, help="CPU threads it computes with (default: its own)")
    leaf(rsub, "list", cmd_rpc_list, "this node's RPC servers")
    p = leaf(rsub, "stop", cmd_rpc_stop, "stop one RPC server")
    p.add_argument("id")
    return parser


def _check_keeper_version() -> None:
    """Refuse a keeper of another release before doing anything it may have meant differently."""
    keeper = os.environ.get(KEEPER_VERSION_ENV)
    if keeper and keeper != __version__:
        raise RbeeError(
            ErrorCode.VERSION_MISMATCH,
            f"node {NODE_PLACEHOLDER} runs rbee {__version__}, this keeper is rbee {keeper}",
            details={"node_version": __version__, "keeper_version": keeper},
            hint=f"rbee-keeper setup upgrade --node {NODE_PLACEHOLDER}",
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Emitter(json_mode=args.json)
    try:
        _check_keeper_version()
        paths = HivePaths.resolve(args.home, args.models_dir)
        args.handler(args, paths, out)
    except RbeeError as err:
        out.error(err)
        return 1
    except KeyboardInterrupt:
        if not out.finished:
            out.error(RbeeError(ErrorCode.REQUEST_CANCELED, "interrupted"))
        return 130
    except Exception as exc:  # a bug: still end the stream with one error event
        traceback.print_exc(file=sys.stderr)
        out.error(RbeeError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
