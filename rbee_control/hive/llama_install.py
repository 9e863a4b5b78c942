"""`rbee-hive install-llama`: build llama-cpp-python for the accelerator this node has.

llama-cpp-python ships as source only, and the backends it can drive are fixed
when it is compiled: a plain `pip install` on a CUDA box gives a CPU build that
never touches the GPU. So the node chooses the CMake flags from `detect`:

- a CUDA device and a CUDA toolkit (`nvcc`) → `-DGGML_CUDA=on`
- Apple Silicon → `-DGGML_METAL=on`
- otherwise → `-DGGML_NATIVE=OFF` (a CPU build that runs on any x86-64 CPU of the family;
  native builds crashed here on quantized models)

`--backend` forces one. The build is recorded in `$RBEE_HOME/llama-build.json`,
which `detect` reports. A CPU build may come from a wheel cache (`--find-links`),
since every CPU build is the same; an accelerator build is always compiled.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.node_events import Emitter

from .devices import NodeDevices, detect, write_build_record
from .paths import HivePaths
from .rpc_servers import has_rpc

LLAMA_VERSION = os.environ.get("RBEE_LLAMA_VERSION", "0.3.36")
CMAKE_FLAGS = {"cuda": "-DGGML_CUDA=on", "metal": "-DGGML_METAL=on", "cpu": "-DGGML_NATIVE=OFF"}
#: seconds pip may take; a CUDA build of llama.cpp on a small machine takes tens of minutes
BUILD_TIMEOUT = 3 * 3600


#: every build also gets llama.cpp's RPC backend, for split workers (see rpc_build for its server)
RPC_FLAG = "-DGGML_RPC=ON"


def wheel_cache() -> Path:
    """`wheels-rpc`: the older `wheels` cache holds builds without the RPC backend."""
    return Path(os.environ.get("RBEE_WHEEL_CACHE") or Path.home() / ".cache" / "rbee" / "wheels-rpc")


@dataclass(frozen=True, slots=True)
class LlamaBuild:
    backend: str
    cmake_args: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _refuse(message: str, hint: str, **details: object) -> RbeeError:
    return RbeeError(ErrorCode.BACKEND_NOT_AVAILABLE, message, status=422, details=details, hint=hint)


def choose_build(node: NodeDevices, forced: str = "auto") -> LlamaBuild:
    """The build this node should get, from what `detect` found (pure: the tests feed it detect output)."""
    cuda, metal = node.find("cuda"), node.find("metal")
    if forced not in ("auto", *CMAKE_FLAGS):
        raise RbeeError(ErrorCode.INVALID_REQUEST, f"invalid backend {forced!r} (auto, cpu, cuda, metal)")
    if forced == "cuda":
        if node.cuda_toolkit is None:
            raise _refuse(
                "a CUDA build needs the CUDA toolkit (nvcc): not on this node's PATH nor in /usr/local/cuda",
                "install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads), or --backend cpu",
                backend="cuda",
            )
        why = f"forced; {len(cuda)} CUDA device(s) seen" + ("" if cuda else " — the driver may be down")
        return LlamaBuild("cuda", CMAKE_FLAGS["cuda"], why)
    if forced == "metal":
        if not metal:
            raise _refuse("Metal builds are for Apple Silicon, and this node is not one", "--backend cpu")
        return LlamaBuild("metal", CMAKE_FLAGS["metal"], "forced")
    if forced == "cpu":
        return LlamaBuild("cpu", CMAKE_FLAGS["cpu"], "forced")
    if cuda and node.cuda_toolkit:
        return LlamaBuild("cuda", CMAKE_FLAGS["cuda"], f"{cuda[0].name} and {node.cuda_toolkit}")
    if metal:
        return LlamaBuild("metal", CMAKE_FLAGS["metal"], metal[0].name)
    if cuda:
        return LlamaBuild(
            "cpu",
            CMAKE_FLAGS["cpu"],
            f"{cuda[0].name} found, but no CUDA toolkit (nvcc) to build for it; add it, then --backend cuda",
        )
    return LlamaBuild("cpu", CMAKE_FLAGS["cpu"], "no GPU found")


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_command(
    build: LlamaBuild, installed: list[str], python: str = sys.executable, rpc_installed: bool = True
) -> tuple[list[str], dict[str, str]]:
    """argv and environment that install this build into `python`'s environment.

    `installed`: the backends of the build there now (a GPU build must be replaced by force,
    and so must one without the RPC backend: `rpc_installed` False).
    """
    spec = f"llama-cpp-python=={LLAMA_VERSION}"
    argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    env = {**os.environ, "CMAKE_ARGS": f"{build.cmake_args} {RPC_FLAG}"}
    if build.backend == "cpu":
        cache = wheel_cache()
        if cache.is_dir():
            argv += ["--find-links", str(cache)]
        if any(b != "cpu" for b in installed) or (installed and not rpc_installed):
            argv += ["--force-reinstall", "--no-deps"]
    else:
        # never a cached or binary wheel: those are CPU builds
        argv += ["--no-binary", "llama-cpp-python", "--no-cache-dir", "--force-reinstall", "--no-deps"]
    return [*argv, spec], env


def install_llama(paths: HivePaths, forced: str, out: Emitter, dry_run: bool = False) -> dict[str, Any]:
    """Choose, build and record; pip's output goes out line by line as log events."""
    node = detect(paths)
    build = choose_build(node, forced)
    rpc_installed = has_rpc()
    argv, env = pip_command(build, node.llama_cpp_backends, rpc_installed=rpc_installed)
    plan = {**build.to_json(), "version": LLAMA_VERSION, "command": argv, "dry_run": dry_run}
    out.log(
        f"llama-cpp-python {LLAMA_VERSION} for {build.backend} ({build.reason}): "
        f"CMAKE_ARGS={env['CMAKE_ARGS']}"
    )
    same = installed_version() == LLAMA_VERSION and build.backend in node.llama_cpp_backends and rpc_installed
    if same and (build.backend != "cpu" or node.llama_cpp_backends == ["cpu"]):
        out.log(
            f"already installed: llama-cpp-python {LLAMA_VERSION} with {', '.join(node.llama_cpp_backends)}"
        )
        if node.llama_cpp_build is None and not dry_run:
            write_build_record(paths, {**plan, "dry_run": False, "reused": True})
        _install_rpc_server(out)
        return {**plan, "already_installed": True, "llama_cpp_backends": node.llama_cpp_backends}
    if dry_run:
        return plan
    started = time.monotonic()
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL
    ) as proc:
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                out.log(line)
                tail = [*tail[-19:], line]
        code = proc.wait(timeout=BUILD_TIMEOUT)
    if code != 0:
        raise RbeeError(
            ErrorCode.INTERNAL_ERROR,
            f"building llama-cpp-python for {build.backend} failed (pip exit {code}): "
            + " | ".join(tail[-3:]),
            details={"cmake_args": build.cmake_args, "log_tail": "\n".join(tail)},
            hint="--backend cpu for a CPU build" if build.backend != "cpu" else None,
        )
    record = {
        **plan,
        "seconds": round(time.monotonic() - started, 1),
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record.pop("dry_run")
    write_build_record(paths, record)
    _install_rpc_server(out)
    return {**record, "llama_cpp_backends": detect(paths).llama_cpp_backends}


def _install_rpc_server(out: Emitter) -> None:
    """The matching ggml-rpc-server beside this Python (built once per version, then cached)."""
    from .rpc_build import install

    out.log("ggml-rpc-server: building from the same llama.cpp sources (once per version)")
    try:
        out.log(f"ggml-rpc-server: {install(LLAMA_VERSION)}")
    except RbeeError as exc:  # llama-cpp-python works without it; only split workers need it here
        out.log(f"ggml-rpc-server: not installed, this node cannot serve layers of a split: {exc.message}")
        if exc.hint:
            out.log(f"ggml-rpc-server: {exc.hint}")
