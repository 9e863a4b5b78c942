"""Where a spawn runs: the backend and device it asked for (or the best one), and whether it fits.

Everything is decided from `detect` and the GGUF header before a process exists,
so a refusal — a backend the node lacks, a llama-cpp-python built without it, a
device that is not there, not enough memory — leaves nothing to clean up. GPU
requests never fall back to the CPU: the operator chooses `--backend cpu`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

from rbee_worker.model_shape import ModelShape
from rbee_worker.planning import (
    SPLIT,
    GpuLayers,
    MemoryPlan,
    check_cache_type,
    check_fits,
    plan_memory,
)
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.runtimes import CTRANSFORMERS, LLAMA_CPP

from . import NODE_PLACEHOLDER
from .devices import Device, NodeDevices

DEVICE_BACKENDS = ("cpu", "cuda", "metal")


def install_hint(backend: str) -> str:
    return f"rbee-keeper setup install --node {NODE_PLACEHOLDER} --extras llama --backend {backend}"


@dataclass(frozen=True, slots=True)
class Placement:
    backend: str
    device: int | None
    runtime: str
    plan: MemoryPlan
    ram_free: int
    device_free: int | None
    warnings: list[str] = field(default_factory=list)


def _unavailable(message: str, hint: str, **details: object) -> RbeeError:
    return RbeeError(ErrorCode.BACKEND_NOT_AVAILABLE, message, status=422, details=details, hint=hint)


def _gpu_usable(node: NodeDevices, backend: str) -> bool:
    return bool(node.find(backend)) and backend in node.llama_cpp_backends


def choose_device(node: NodeDevices, backend: str, device: int | None, runtime: str) -> tuple[str, Device]:
    """The (backend, device) a spawn gets; `auto` prefers a GPU llama-cpp-python can drive."""
    if backend not in ("auto", *DEVICE_BACKENDS):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"invalid backend {backend!r} (choose auto, cpu, cuda or metal)",
            status=400,
            details={"field": "backend", "got": backend, "valid": ["auto", *DEVICE_BACKENDS]},
            hint="e.g. --backend cuda --device 0",
        )
    if backend == "auto":
        gpus = [b for b in ("cuda", "metal") if _gpu_usable(node, b)] if runtime != CTRANSFORMERS else []
        backend = gpus[0] if gpus else "cpu"
    available = node.backends
    if backend != "cpu":
        if runtime == CTRANSFORMERS:
            raise _unavailable(
                f"the ctransformers runtime runs on the CPU only, not {backend}",
                f"--runtime llama-cpp --backend {backend}",
                backend=backend,
                runtime=runtime,
            )
        if not node.find(backend):
            why = "".join(f"; {w}" for w in node.warnings if backend == "cuda" and "nvidia-smi" in w)
            raise _unavailable(
                f"backend {backend} is not available on this node (available: {', '.join(available)}){why}",
                "--backend cpu",
                backend=backend,
                available=available,
                warnings=node.warnings,
            )
        if backend not in node.llama_cpp_backends:
            built = ", ".join(node.llama_cpp_backends) or "nothing (not installed)"
            raise _unavailable(
                f"llama-cpp-python on this node was built for {built}, not {backend}",
                install_hint(backend),
                backend=backend,
                llama_cpp_backends=node.llama_cpp_backends,
            )
    candidates = node.find(backend)
    if device is None:
        return backend, max(candidates, key=lambda d: d.memory_free_bytes)
    chosen = [d for d in candidates if d.device == device]
    if not chosen:
        ids = [d.device for d in candidates]
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            f"{backend} device {device} is not available (available: {ids})",
            status=422,
            details={"backend": backend, "device": device, "available": ids},
            hint=" or ".join(f"--device {i}" for i in ids),
        )
    return backend, chosen[0]


def runtime_request(node: NodeDevices, runtime: str, backend: str) -> str:
    """The runtime to ask for: a GPU placement needs llama-cpp, so `auto` becomes it when one is wanted."""
    if runtime != "auto":
        return runtime
    usable_gpu = any(_gpu_usable(node, b) for b in ("cuda", "metal"))
    if backend in ("cuda", "metal") or (backend == "auto" and usable_gpu):
        return LLAMA_CPP
    return runtime


class Planned(Protocol):
    backend: str
    device: int | None
    planned_bytes: int


def reserve_loading(node: NodeDevices, loading: Iterable[Planned]) -> NodeDevices:
    """The node as it will be once `loading` workers hold what they were planned: their memory is taken.

    A worker still loading has not allocated yet, so free memory alone would let two
    spawns in a row both count it.
    """
    taken: dict[tuple[str, int], int] = {}
    for w in loading:
        pools = [("cpu", 0)] if w.backend == "cpu" else [(w.backend, w.device or 0)]
        if w.backend == "metal":
            pools.append(("cpu", 0))  # unified memory
        for key in pools:
            taken[key] = taken.get(key, 0) + w.planned_bytes
    if not taken:
        return node
    devices = [
        replace(d, memory_free_bytes=max(0, d.memory_free_bytes - taken.get((d.backend, d.device), 0)))
        for d in node.devices
    ]
    return replace(node, devices=devices)


def place(
    node: NodeDevices,
    shape: ModelShape,
    *,
    runtime: str,
    backend: str = "auto",
    device: int | None = None,
    gpu_layers: GpuLayers = "auto",
    slots: int = 1,
    ctx: int | None = None,
    ram_headroom: float = 1.0,
    model: str = "",
    rpc_free: int | None = None,
    cache_type: str = "f16",
) -> Placement:
    """Choose the device, plan the memory, refuse what does not fit (`INSUFFICIENT_RAM|VRAM`).

    `runtime` is the one chosen for the model (auto already resolved); a GPU backend needs llama-cpp.
    `rpc_free` (a split worker on the CPU): the free memory of its RPC servers, where its layers go.
    """
    backend, dev = choose_device(node, backend, device, runtime)
    if backend != "cpu" and runtime != LLAMA_CPP:
        raise _unavailable(f"{backend} needs the llama-cpp runtime, not {runtime}", "--runtime llama-cpp")
    check_cache_type(shape, cache_type)
    ram = node.find("cpu")[0].memory_free_bytes
    split = rpc_free is not None and backend == "cpu"  # a split worker: the layers go to the RPC servers
    device_free = rpc_free if split else None if backend == "cpu" else dev.memory_free_bytes
    plan = plan_memory(
        shape,
        backend=SPLIT if split else backend,
        slots=slots,
        ctx=ctx,
        device=None if backend == "cpu" else dev.device,
        gpu_layers=gpu_layers,
        device_free=device_free,
        cache_type=cache_type,
    )
    check_fits(plan, ram, device_free, model=model, ram_headroom=ram_headroom)
    if split:  # what the servers have free is none of this node's devices
        return Placement(backend, None, runtime, plan, ram, None, [])
    warnings = [w for w in node.warnings if backend == "cpu" and "not built for" in w]
    return Placement(backend, plan.device, runtime, plan, ram, device_free, warnings)
