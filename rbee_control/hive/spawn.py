"""Starting one worker process: preflight, runtime and device, port, key, launch.

Everything that can be refused (model unknown, runtime or device missing, not enough
memory, no free port) is checked before a process exists, so a refusal leaves nothing to
clean up. The API key reaches the worker through its environment, never argv,
which any user on the node can read with `ps`; the rest of that environment is an
allow-list (`worker_env.py`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
import time

from rbee_worker.gguf_info import GGUFInfo
from rbee_worker.logfile import WORKER_LOG_ENV
from rbee_worker.planning import SPLIT
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.spawn import DEFAULT_CACHE_TYPE, SpawnRequest
from rbee_worker.runtimes import choose_backend as worker_choose_runtime

from . import tls
from .catalog import ModelRow
from .config import HiveConfig
from .paths import HivePaths
from .pidfiles import WorkerFile
from .placement import Placement
from .process import create_time
from .worker_env import worker_env


def choose_runtime(requested: str, model: ModelRow) -> str:
    """Pick as the worker would, from the metadata catalogued at add time (re-parsing costs seconds)."""
    if not os.path.isfile(model.path):
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND,
            f"the file of model {model.name!r} is gone: {model.path}",
            details={"name": model.name, "path": model.path},
            hint=f"rbee-hive models rm {model.name} && rbee-hive models add {model.ref}",
        )
    info = GGUFInfo(
        path=model.path,
        size=model.size,
        architecture=model.architecture,
        tokenizer_model=model.tokenizer_model,
        name=model.name,
        context_length=model.context_length,
        quantization=model.quantization or "unknown",
        chat_template=model.chat_template,
        bos_token=None,
        eos_token=None,
    )
    return worker_choose_runtime(info, requested)


def port_is_free(address: str, port: int) -> bool:
    """Can a server bind here? (SO_REUSEADDR like uvicorn, so TIME_WAIT leftovers do not count.)"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def pick_port(config: HiveConfig, taken: set[int]) -> int:
    """The lowest port in range that no worker of ours holds and nothing else has bound."""
    for port in range(config.port_min, config.port_max + 1):
        if port not in taken and port_is_free(config.address, port):
            return port
    raise RbeeError(
        ErrorCode.NO_PORT_AVAILABLE,
        f"no free port in {config.port_min}-{config.port_max} on {config.address}",
        details={"address": config.address, "range": [config.port_min, config.port_max]},
        hint="stop idle workers: rbee-hive worker list",
    )


def new_worker_id() -> str:
    return f"worker-{secrets.token_hex(4)}"


def advertised_host(config: HiveConfig) -> str:
    if config.advertise:
        return config.advertise
    return socket.gethostname() if config.address in ("0.0.0.0", "::") else config.address


def worker_url(address: str, port: int, scheme: str = "http") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


def certificate_hosts(config: HiveConfig) -> list[str]:
    """The names a worker's certificate carries (informational: clients pin the certificate itself)."""
    hosts = [advertised_host(config), config.address, socket.gethostname()]
    return [h for h in dict.fromkeys(hosts) if h not in ("", "0.0.0.0", "::")]


async def launch(
    paths: HivePaths,
    config: HiveConfig,
    req: SpawnRequest,
    model: ModelRow,
    placement: Placement,
    worker_id: str,
    port: int,
) -> tuple[WorkerFile, asyncio.subprocess.Process]:
    """Start the worker detached (own session) with its log file; write its record.

    A CUDA worker sees only its own GPU (CUDA_VISIBLE_DEVICES), so nothing it
    allocates can land on a device another worker was planned onto.
    """
    api_key = secrets.token_urlsafe(32)
    plan = placement.plan
    cmd = [
        sys.executable, "-m", "rbee_worker.cli", "serve",
        "--model", model.path,
        "--host", config.address,
        "--port", str(port),
        "--runtime", placement.runtime,
        "--backend", placement.backend,
        "--gpu-layers", str(plan.gpu_layers),
        "--slots", str(req.slots),
        "--ctx", str(plan.ctx),
        "--worker-id", worker_id,
        "--callback-url", "http://hive/v1/workers/ready",
        "--callback-uds", str(paths.socket),
    ]  # fmt: skip
    if placement.device is not None:
        cmd += ["--device", str(placement.device)]
    if req.threads:
        cmd += ["--threads", str(req.threads)]
    if req.rpc_servers:
        cmd += ["--rpc", ",".join(req.rpc_servers)]
    if req.tensor_split:
        cmd += ["--tensor-split", ",".join(f"{w:g}" for w in req.tensor_split)]
    if req.embedding:
        cmd.append("--embedding")
    if req.cache_type != DEFAULT_CACHE_TYPE:
        cmd += ["--cache-type", req.cache_type]
    scheme = "http"
    if tls.needs_tls(config.address, config.tls):  # the keys, prompts and answers would cross the LAN
        cert = tls.ensure_certificate(paths.tls_dir, certificate_hosts(config))
        cmd += ["--ssl-certfile", str(cert.cert), "--ssl-keyfile", str(cert.key)]
        scheme = "https"
    env = worker_env(os.environ, api_key)
    env[WORKER_LOG_ENV] = str(paths.worker_log(worker_id))
    if placement.backend == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(placement.device)
    with paths.worker_log(worker_id).open("ab") as log:
        log.write(
            f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} hive starts {worker_id} on port {port}\n".encode()
        )
        log.flush()
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=paths.home,
            start_new_session=True,
        )
    record = WorkerFile(
        id=worker_id,
        pid=proc.pid,
        create_time=create_time(proc.pid),
        port=port,
        url=worker_url(advertised_host(config), port, scheme),
        model=model.name,
        model_path=model.path,
        backend=placement.backend,
        api_key=api_key,
        slots=req.slots,
        started_at=round(time.time(), 3),
        runtime=placement.runtime,
        device=placement.device,
        gpu_layers=plan.gpu_layers,
        planned_bytes=plan.host_bytes if plan.backend == SPLIT else plan.total_bytes,  # what lands here
        rpc_servers=list(req.rpc_servers),
        embedding=req.embedding,
    )
    record.save(paths)
    return record, proc


def log_tail(paths: HivePaths, worker_id: str, lines: int = 15) -> str:
    """The end of a worker's log: the first thing anyone needs when it died."""
    try:
        with paths.worker_log(worker_id).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def log_size(paths: HivePaths, worker_id: str) -> int:
    try:
        return paths.worker_log(worker_id).stat().st_size
    except OSError:
        return 0


def log_since(paths: HivePaths, worker_id: str, offset: int) -> str:
    """What the worker wrote since `offset` (the hive's own header line comes first)."""
    try:
        with paths.worker_log(worker_id).open("rb") as f:
            f.seek(offset)
            return f.read(65536).decode("utf-8", "replace")
    except OSError:
        return ""
