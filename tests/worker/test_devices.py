"""The worker's `--backend/--device/--gpu-layers` on this CPU-only machine and its CPU build of llama.cpp.

What a GPU would do cannot run here; what can is checked for real: the worker
asks its own llama-cpp-python which devices exist, refuses a GPU it cannot
drive with the command that installs a build for it, and exits — and its
memory plan agrees with what llama.cpp itself allocates.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rbee_worker.model_shape import read_model_shape
from rbee_worker.planning import kv_cells, plan_memory
from rbee_worker.runtimes.device_choice import choose, visible_index
from rbee_worker.runtimes.llama_devices import GgmlDevice

from ..worker_proc import WorkerProcess

MIB = 1 << 20


def refused(worker: WorkerProcess) -> str:
    assert worker.wait_exit(30) == 1
    log = worker.log()
    assert "Traceback" not in log, log
    return log


@pytest.mark.llama
@pytest.mark.parametrize("backend", ["cuda", "metal"])
async def test_a_gpu_backend_on_a_cpu_build_is_refused(
    worker_factory: type[WorkerProcess], tiny_model: Path, backend: str
) -> None:
    worker = worker_factory(tiny_model, extra=["--backend", backend, "--device", "0"])
    log = refused(worker)
    assert f"rbee-worker: backend {backend} is not available to this worker" in log
    assert "its llama-cpp-python sees cpu only" in log
    assert f"rbee-keeper setup install --node <node> --extras llama --backend {backend}" in log


async def test_ctransformers_never_runs_on_a_gpu(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = worker_factory(tiny_model, extra=["--runtime", "ctransformers", "--backend", "cuda"])
    assert "the ctransformers runtime runs on the CPU only, not cuda" in refused(worker)


@pytest.mark.parametrize("flags", [["--gpu-layers", "many"], ["--gpu-layers", "-2"], ["--device", "-1"]])
def test_bad_device_flags_are_usage_errors(tiny_model: Path, flags: list[str]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rbee_worker.cli",
            "serve",
            "--model",
            str(tiny_model),
            "--api-key",
            "k",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and ("gpu layers" in proc.stderr or "--device" in proc.stderr), proc.stderr


@pytest.mark.llama
async def test_auto_on_this_machine_is_the_cpu(worker_factory: type[WorkerProcess], tiny_model: Path) -> None:
    worker = worker_factory(tiny_model, extra=["--runtime", "llama-cpp"])
    ready = worker.wait_ready(60)
    assert ready["runtime"] == "llama-cpp" and ready["backend"] == "cpu"
    assert ready["device"] is None and ready["gpu_layers"] == 0 and ready["vram_bytes"] == 0


@pytest.mark.llama
def test_this_build_sees_one_cpu_device() -> None:
    from rbee_worker.runtimes.llama_devices import built_backends, ggml_devices, supports_gpu_offload

    devices = ggml_devices()
    assert [d.backend for d in devices] == ["cpu"] and devices[0].memory_total_bytes > 0
    assert built_backends() == ["cpu"] and supports_gpu_offload() is False


def test_device_choice_on_a_two_gpu_cuda_build(tiny_model: Path) -> None:
    """The worker's side of a CUDA node, fed the registry a CUDA build reports (pure logic)."""
    gib = 1 << 30
    devices = [
        GgmlDevice("cpu", 0, "CPU", "AMD Ryzen 9 7950X", 60 * gib, 64 * gib),
        GgmlDevice("cuda", 0, "CUDA0", "NVIDIA GeForce RTX 4090", 23 * gib, 24 * gib),
        GgmlDevice("cuda", 1, "CUDA1", "NVIDIA GeForce RTX 3060", 1 * gib, 12 * gib),
    ]
    shape = read_model_shape(tiny_model)
    kw = {"runtime": "llama-cpp", "devices": devices, "shape": shape, "slots": 1, "ctx": 512}
    auto = choose("auto", None, "auto", **kw)  # type: ignore[arg-type]
    assert (auto.backend, auto.device, auto.main_gpu, auto.n_gpu_layers) == ("cuda", 0, 0, shape.n_layers + 1)
    # the hive pinned GPU 1 with CUDA_VISIBLE_DEVICES=1: this process sees it as its device 0
    pinned = choose("cuda", 1, 5, **kw, env={"CUDA_VISIBLE_DEVICES": "1"})  # type: ignore[arg-type]
    assert (pinned.device, pinned.main_gpu, pinned.n_gpu_layers) == (1, 0, 5)
    assert visible_index(3, {"CUDA_VISIBLE_DEVICES": "2,3"}) == 1 and visible_index(1, {}) == 1
    unpinned = choose("cuda", 1, "all", **kw, env={})  # type: ignore[arg-type]
    assert unpinned.main_gpu == 1 and unpinned.n_gpu_layers == shape.n_layers + 1
    with pytest.raises(Exception, match="cuda device 4 is not available"):
        choose("cuda", 4, "auto", **kw, env={})  # type: ignore[arg-type]
    with pytest.raises(Exception, match="sees cpu, cuda only"):
        choose("metal", None, "auto", **kw)  # type: ignore[arg-type]


@pytest.mark.llama
@pytest.mark.slow
@pytest.mark.parametrize(("slots", "ctx"), [(1, 512), (4, 1024), (4, 4096)])
def test_the_plan_matches_what_llama_cpp_allocates(smollm2: Path, slots: int, ctx: int) -> None:
    """llama.cpp's log for SmolLM2: the KV cache to the byte, the compute buffer just under the estimate."""
    cells = kv_cells(slots, ctx)
    script = textwrap.dedent(
        f"""
        from llama_cpp import Llama
        llm = Llama(model_path={str(smollm2)!r}, n_ctx={cells}, n_threads=1, n_gpu_layers=0, verbose=True)
        llm.close()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stderr
    kv = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells", log)
    compute = re.search(r"CPU compute buffer size\s*=\s*([\d.]+) MiB", log)
    assert kv and compute, log[-3000:]
    plan = plan_memory(read_model_shape(smollm2), backend="cpu", slots=slots, ctx=ctx)
    assert int(kv.group(2)) == cells
    assert float(kv.group(1)) == pytest.approx(plan.kv_bytes / MIB, abs=0.01)
    real = float(compute.group(1)) * MIB
    assert real <= plan.compute_bytes <= real * 1.05
