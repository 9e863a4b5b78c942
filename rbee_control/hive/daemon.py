"""Running, detaching and stopping the hive daemon.

One daemon per `$RBEE_HOME`: the pid file decides, and a second start reports the
first instead of failing. The socket is bound by us (not uvicorn, which would make
it 0666) under umask 077, so only the node's user can spawn workers or read keys.
Whatever way the daemon ends — `stop`, SIGTERM, SIGINT, Ctrl-C twice — its workers
are stopped first; `stop` also cleans up after a daemon that was killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import httpx
import uvicorn

from rbee_worker.logfile import log_to
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from . import __version__, tls
from .api import create_app
from .client import HiveClient, wait_for_hive
from .config import HiveConfig
from .paths import HivePaths
from .pidfiles import claim_hive_pid, read_worker_files, release_hive_pid, running_hive
from .process import is_alive, terminate, wait_gone
from .rpc_servers import RpcServers
from .spawn import certificate_hosts
from .status import base_info
from .supervisor import Supervisor, stop_worker_process

log = logging.getLogger("rbee.hive")

DETACH_TIMEOUT = 20.0


def _bind_socket(paths: HivePaths) -> socket.socket:
    paths.socket.unlink(missing_ok=True)  # stale: the pid file says no daemon owns it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(paths.socket))
    finally:
        os.umask(old)
    os.chmod(paths.socket, 0o600)
    return sock


def _setup_logging(paths: HivePaths) -> None:
    log_to(paths.hive_log)  # rotating: a hive that runs for months does not fill the disk
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run_daemon(paths: HivePaths, config: HiveConfig, on_serving: Any = None) -> int:
    """Serve in the foreground until stopped; 0 also when another daemon already runs."""
    paths.ensure()
    other = claim_hive_pid(paths)
    if other is not None:
        if on_serving:
            on_serving({"status": "already_running", **base_info(paths, other)})
        return 0
    _setup_logging(paths)
    cert = tls.ensure_certificate(paths.tls_dir, certificate_hosts(config))  # made on first start
    in_use = "in use" if tls.needs_tls(config.address, config.tls) else "unused: workers are on loopback"
    log.info("worker certificate %s (%s)", cert.fingerprint, in_use)
    log.info(
        "hive %s starting (pid %d, home %s, workers on %s)",
        __version__,
        os.getpid(),
        paths.home,
        config.address,
    )
    try:
        asyncio.run(_serve(paths, config, on_serving))
    finally:
        paths.socket.unlink(missing_ok=True)
        release_hive_pid(paths)
        log.info("hive stopped")
    return 0


async def _serve(paths: HivePaths, config: HiveConfig, on_serving: Any) -> None:
    supervisor = Supervisor(paths, config)
    server: uvicorn.Server | None = None

    def request_exit(*_: Any) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(supervisor, request_exit)
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    )
    # uvicorn re-raises a captured signal after serving; these handlers make that harmless
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_exit)
    sock = _bind_socket(paths)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            log.info("serving on %s", paths.socket)
            if on_serving:
                on_serving({"status": "started", **base_info(paths, os.getpid())})
        await serving
    finally:
        await supervisor.close()  # a forced exit skips the lifespan; the cascade must not be skipped


def detach(paths: HivePaths, config: HiveConfig) -> dict[str, Any]:
    """Start the daemon in its own session and return once its socket answers health."""
    paths.ensure()
    pid = running_hive(paths)
    if pid is not None:
        return {"status": "already_running", **base_info(paths, pid)}
    cmd = [
        sys.executable,
        "-m",
        "rbee_control.hive.cli",
        "daemon",
        "--home",
        str(paths.home),
        *(["--models-dir", str(paths.models_override)] if paths.models_override else []),
        *config.to_args(),
    ]
    with paths.hive_log.open("ab") as logf:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, cwd=paths.home
        )
    try:
        health = asyncio.run(wait_for_hive(paths, DETACH_TIMEOUT, alive=lambda: proc.poll() is None))
    except RbeeError:
        code = proc.poll()
        if code is None:  # never answered: do not leave a half-started daemon behind
            proc.kill()
            proc.wait()
        other = running_hive(paths)
        if other is not None:  # lost a start race to another daemon, which is fine
            return {"status": "already_running", **base_info(paths, other)}
        raise RbeeError(
            ErrorCode.INTERNAL_ERROR,
            "the hive daemon did not start" + (f" (exit code {code})" if code is not None else ""),
            details={"log": str(paths.hive_log), "log_tail": _tail(paths.hive_log)},
            hint=f"tail {paths.hive_log}",
        ) from None
    status = "started" if health.pid == proc.pid else "already_running"
    return {"status": status, **base_info(paths, health.pid)}


async def stop_hive(paths: HivePaths, grace: float = 30.0) -> dict[str, Any]:
    """Stop the daemon (it cascades to its workers), then any worker a dead daemon left behind."""
    pid = running_hive(paths)
    workers = 0
    how = "not_running"
    if pid is not None:
        try:
            async with HiveClient(paths) as hive:
                workers = (await hive.shutdown()).workers
            how = "graceful"
        except RbeeError:
            os.kill(pid, signal.SIGTERM)
            how = "terminated"
        if not await wait_gone(pid, None, grace):
            how = await terminate(pid, None, term_grace=10.0)
    async with httpx.AsyncClient(timeout=5.0, verify=tls.client_verify(paths.tls_dir)) as http:
        leftovers = [f for f in read_worker_files(paths) if is_alive(f.pid, f.create_time)]
        await asyncio.gather(*(stop_worker_process(http, f, 10.0) for f in leftovers))
    for f in read_worker_files(paths):
        f.remove(paths)
    await RpcServers(paths, HiveConfig()).clean_leftovers()  # after the workers that used them
    if pid is None:
        paths.socket.unlink(missing_ok=True)
    return {
        "stopped": pid is not None,
        "how": how,
        "workers_stopped": workers,
        "orphans_stopped": len(leftovers),
        **base_info(paths, pid),
    }


def _tail(path: os.PathLike[str], lines: int = 20) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    return ""
