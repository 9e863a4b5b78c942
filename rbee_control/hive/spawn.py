"""Starting one worker process: preflight, runtime, port, key, launch.

Everything that can be refused (model unknown, runtime missing, not enough RAM,
no free port) is checked before a process exists, so a refusal leaves nothing to
clean up. The API key reaches the worker through its environment, never argv,
which any user on the node can read with `ps`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
import time

import psutil

from rbee_worker.cli import serve_options
from rbee_worker.gguf_info import GGUFInfo
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.spawn import AUTO, SpawnRequest
from rbee_worker.runtimes import choose_backend as worker_choose_runtime

from .catalog import ModelRow
from .config import HiveConfig
from .paths import HivePaths
from .pidfiles import WorkerFile
from .process import create_time

MB = 1 << 20


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


def device_argv(req: SpawnRequest, accepted: frozenset[str] | None = None) -> list[str]:
    """`--backend/--device/--gpu-layers` for the worker, each only if its `serve` knows the flag.

    A worker that does not know one runs on the CPU only, so a request that needs
    it is refused here rather than quietly served on the wrong device.
    """
    accepted = serve_options() if accepted is None else accepted
    wanted = {
        "--backend": None if req.backend == AUTO else req.backend,
        "--device": None if req.device is None else str(req.device),
        "--gpu-layers": None if req.gpu_layers == AUTO else str(req.gpu_layers),
    }
    argv: list[str] = []
    for flag, value in wanted.items():
        if value is None:
            continue
        if flag in accepted:
            argv += [flag, value]
        elif not (flag == "--backend" and value == "cpu") and not (flag == "--gpu-layers" and value == "0"):
            raise RbeeError(
                ErrorCode.BACKEND_NOT_AVAILABLE,
                f"this node's rbee-worker runs on the CPU only; it cannot take {flag} {value}",
                details={"field": flag.removeprefix("--").replace("-", "_"), "value": value},
                hint="leave --backend, --device and --gpu-layers at auto, or update rbee on the node",
            )
    return argv


def check_ram(model: ModelRow, factor: float) -> None:
    available = psutil.virtual_memory().available
    required = int(model.size * factor)
    if available < required:
        raise RbeeError(
            ErrorCode.INSUFFICIENT_RAM,
            f"insufficient RAM: need {required // MB} MB (model size × {factor}), have {available // MB} MB",
            details={
                "model": model.name,
                "required_bytes": required,
                "available_bytes": available,
                "required_mb": required // MB,
                "available_mb": available // MB,
                "ram_factor": factor,
            },
            hint="stop other workers (rbee-hive worker list / stop) or use a smaller quantization",
        )


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


def worker_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


async def launch(
    paths: HivePaths,
    config: HiveConfig,
    req: SpawnRequest,
    model: ModelRow,
    runtime: str,
    worker_id: str,
    port: int,
) -> tuple[WorkerFile, asyncio.subprocess.Process]:
    """Start the worker detached (own session) with its log file; write its record."""
    api_key = secrets.token_urlsafe(32)
    cmd = [
        sys.executable, "-m", "rbee_worker.cli", "serve",
        "--model", model.path,
        "--host", config.address,
        "--port", str(port),
        "--runtime", runtime,
        "--slots", str(req.slots),
        "--worker-id", worker_id,
        "--callback-url", "http://hive/v1/workers/ready",
        "--callback-uds", str(paths.socket),
    ]  # fmt: skip
    if req.ctx_size:
        cmd += ["--ctx-size", str(req.ctx_size)]
    cmd += device_argv(req)
    if req.threads:
        cmd += ["--threads", str(req.threads)]
    env = {**os.environ, "RBEE_WORKER_API_KEY": api_key}
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
        url=worker_url(advertised_host(config), port),
        model=model.name,
        model_path=model.path,
        runtime=runtime,
        api_key=api_key,
        slots=req.slots,
        started_at=round(time.time(), 3),
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
