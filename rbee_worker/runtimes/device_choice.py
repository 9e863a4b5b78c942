"""The worker's side of `--backend / --device / --gpu-layers`: check, pin, resolve.

The hive has already checked the node (`rbee-hive detect`); the worker checks
again against what its own llama-cpp-python build sees in ggml's registry, so a
worker started by hand with `--backend cuda` on a CPU build exits with the reason
and the command that installs a CUDA build, instead of silently running on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from ..model_shape import ModelShape
from ..planning import GpuLayers, plan_memory
from ..protocol.errors import ErrorCode, RbeeError
from .llama_devices import GgmlDevice

GPU_BACKENDS = ("cuda", "metal")
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def install_hint(backend: str) -> str:
    return f"rbee-keeper setup install --node <node> --extras llama --backend {backend}"


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    backend: str
    #: the device as the node numbers it (what the hive and `nvidia-smi` call it)
    device: int | None
    #: the same device as this process's ggml sees it (after CUDA_VISIBLE_DEVICES)
    main_gpu: int
    n_gpu_layers: int
    memory_free_bytes: int | None = None


def pin_visible_device(backend: str, device: int | None, env: dict[str, str] | None = None) -> None:
    """Make only `device` visible to CUDA, unless the parent already chose (the hive does).

    Must run before llama_cpp is imported: CUDA reads the variable once, at initialisation.
    """
    target: MutableMapping[str, str] = os.environ if env is None else env
    if backend == "cuda" and device is not None and VISIBLE_ENV not in target:
        target[VISIBLE_ENV] = str(device)


def visible_index(device: int | None, env: Mapping[str, str] | None = None) -> int:
    """`device`'s index among the GPUs this process can see."""
    if device is None:
        return 0
    visible = [v.strip() for v in (os.environ if env is None else env).get(VISIBLE_ENV, "").split(",")]
    return visible.index(str(device)) if str(device) in visible else device


def choose(
    backend: str,
    device: int | None,
    gpu_layers: GpuLayers,
    *,
    runtime: str,
    devices: list[GgmlDevice] | None,
    shape: ModelShape | None,
    slots: int,
    ctx: int,
    env: Mapping[str, str] | None = None,
) -> DeviceChoice:
    """Resolve the request against the devices ggml reports (None: the runtime is not llama-cpp)."""
    gpus = [d for d in devices or [] if d.backend in GPU_BACKENDS]
    if backend == "auto":
        backend = gpus[0].backend if gpus and runtime == "llama-cpp" else "cpu"
    if backend == "cpu":
        return DeviceChoice("cpu", None, 0, 0)
    if runtime != "llama-cpp":
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            f"the {runtime} runtime runs on the CPU only, not {backend}; use --runtime llama-cpp",
            status=422,
            details={"backend": backend, "runtime": runtime},
        )
    mine = [d for d in gpus if d.backend == backend]
    if not mine:
        seen = sorted({d.backend for d in devices or []}) or ["cpu"]
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            f"backend {backend} is not available to this worker: its llama-cpp-python sees "
            f"{', '.join(seen)} only (a build without {backend}, or no {backend} device); "
            f"install a {backend} build: {install_hint(backend)}",
            status=422,
            details={"backend": backend, "available": seen},
            hint=install_hint(backend),
        )
    index = visible_index(device, env) if backend == "cuda" else 0
    chosen = [d for d in mine if d.index == index]
    if not chosen:
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            f"{backend} device {device} is not available (this worker sees {[d.index for d in mine]})",
            status=422,
            details={"backend": backend, "device": device},
        )
    dev = chosen[0]
    if isinstance(gpu_layers, int):
        steps = gpu_layers
    elif gpu_layers == "all" or shape is None:
        steps = shape.n_layers + 1 if shape is not None else 999
    else:
        plan = plan_memory(
            shape,
            backend=backend,
            slots=slots,
            ctx=ctx,
            gpu_layers="auto",
            device_free=dev.memory_free_bytes,
        )
        steps = plan.gpu_layers
    return DeviceChoice(backend, device if device is not None else 0, index, steps, dev.memory_free_bytes)


def runtime_for(requested: str, backend: str) -> str:
    """A GPU needs llama-cpp: `auto` becomes it when a GPU is asked for, or when the build has one."""
    from .llama_devices import built_backends

    if requested != "auto":
        return requested
    if backend in GPU_BACKENDS:
        return "llama-cpp"
    if backend == "auto" and any(b in GPU_BACKENDS for b in built_backends()):
        return "llama-cpp"
    return requested


def for_worker(
    backend: str,
    device: int | None,
    gpu_layers: GpuLayers,
    *,
    runtime: str,
    model_path: str,
    slots: int,
    ctx: int,
) -> DeviceChoice:
    """`choose` with the devices of this process's llama-cpp-python (imported here, in a thread)."""
    from ..model_shape import read_model_shape
    from .llama_devices import ggml_devices

    if runtime != "llama-cpp":
        return choose(
            backend, device, gpu_layers, runtime=runtime, devices=None, shape=None, slots=slots, ctx=ctx
        )
    shape = read_model_shape(model_path) if gpu_layers == "auto" and backend != "cpu" else None
    return choose(
        backend,
        device,
        gpu_layers,
        runtime=runtime,
        devices=ggml_devices(),
        shape=shape,
        slots=slots,
        ctx=ctx,
    )


def vram_used(choice: DeviceChoice) -> int:
    """How much of the device's memory the load took (free before − free now); 0 on the CPU."""
    from .llama_devices import ggml_devices

    if choice.backend == "cpu" or choice.memory_free_bytes is None:
        return 0
    now = [d for d in ggml_devices() if d.backend == choice.backend and d.index == choice.main_gpu]
    return max(0, choice.memory_free_bytes - now[0].memory_free_bytes) if now else 0
