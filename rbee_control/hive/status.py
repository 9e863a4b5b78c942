"""`rbee-hive status`: what the keeper asks every node for, so it imports nothing heavy.

The daemon's modules pull in uvicorn, the GGUF reader and numpy; a status call
over SSH pays Python start-up on every node of a fan-out, so it stays on this
short path: the pid file, the catalog, a few system facts and, when the daemon
runs, two requests over its Unix socket. The daemon serves the same answer itself
(`GET /v1/status`), which the keeper reads over an SSH streamlocal channel without
starting any process; this command is the path for a node whose daemon is not running.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

import psutil

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.runtimes import BACKENDS, is_installed

from . import API_VERSION, __version__
from .catalog import Catalog
from .client import HiveClient, hive_not_running
from .devices import detect
from .paths import HivePaths
from .pidfiles import running_hive


def base_info(paths: HivePaths, pid: int | None) -> dict[str, Any]:
    return {
        "pid": pid,
        "home": str(paths.home),
        "socket": str(paths.socket),
        "log": str(paths.hive_log),
        "version": __version__,
        "api_version": API_VERSION,
    }


def available_backends() -> list[str]:
    return [b for b in BACKENDS if is_installed(b)]


def node_facts(paths: HivePaths) -> dict[str, Any]:
    """What the keeper shows per node and needs for placement: memory, devices, disk, runtimes, models."""
    mem = psutil.virtual_memory()
    devices = detect(paths)
    return {
        "devices": [d.to_json() for d in devices.devices],
        "llama_cpp_backends": devices.llama_cpp_backends,
        "device_warnings": devices.warnings,
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "ram_total": mem.total,
        "ram_available": mem.available,
        "disk_free": shutil.disk_usage(paths.models_dir).free,
        "backends": available_backends(),
        "models": len(Catalog(paths.db).list()),
    }


async def _rpc_servers(hive: HiveClient) -> list[Any]:
    """A daemon older than this CLI has no RPC servers to list (404): none, not a failed status."""
    try:
        return list(await hive.rpc_list())
    except RbeeError as exc:
        if exc.status == 404:
            return []
        raise


async def hive_status(paths: HivePaths) -> dict[str, Any]:
    paths.ensure()
    pid = running_hive(paths)
    if pid is None:
        return {"running": False, "workers": [], "node": node_facts(paths), **base_info(paths, None)}
    try:
        async with HiveClient(paths) as hive:
            health = await hive.health()
            workers = await hive.list_workers()
            rpc_servers = await _rpc_servers(hive)
    except RbeeError as exc:
        if exc.code == ErrorCode.HIVE_NOT_RUNNING:  # pid alive but socket silent: starting or wedged
            raise hive_not_running(paths) from None
        raise
    rpc = [s.to_json() for s in rpc_servers]
    return running_status(paths, health.pid or pid, [w.to_json() for w in workers], rpc)


def running_status(
    paths: HivePaths, pid: int | None, workers: list[dict[str, Any]], rpc_servers: list[dict[str, Any]]
) -> dict[str, Any]:
    """A running hive's status: the same shape whether the CLI or the daemon answers."""
    return {
        "running": True,
        "workers": workers,
        "rpc_servers": rpc_servers,
        "node": node_facts(paths),
        **base_info(paths, pid),
    }
