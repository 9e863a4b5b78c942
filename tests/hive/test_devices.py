"""`rbee-hive detect` against real and captured `nvidia-smi` / `sysctl`, and the spawn refusals it drives."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rbee_control.hive.devices import parse_nvidia_smi

from .. import fake_gpu
from .conftest import Hive, cleanup, hive_env
from .servers import FileServer

MIB = 1 << 20
PORTS = ("--port-min", "8800", "--port-max", "8849")
LLAMA_INSTALLED = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    return tmp_path / "fakebin"


@pytest.fixture
def node(tmp_path: Path, file_server: FileServer, fake_bin: Path) -> Iterator[Hive]:
    """A hive whose PATH starts with `fake_bin` (empty unless a test puts programs there)."""
    fake_bin.mkdir(exist_ok=True)
    hive = Hive(tmp_path / "home", fake_gpu.with_path(hive_env(tmp_path, file_server), fake_bin))
    yield hive
    cleanup(hive)


def detect(hive: Hive) -> dict:
    return hive.ok("detect")


def test_this_machine_has_a_cpu_and_no_gpu(node: Hive) -> None:
    info = detect(node)
    assert [d["backend"] for d in info["devices"]] == ["cpu"]
    cpu = info["devices"][0]
    assert cpu["device"] == 0 and cpu["memory_total_bytes"] >= cpu["memory_free_bytes"] > 0
    assert info["cpu_cores"] >= 1 and info["backends"] == ["cpu"]
    assert info["warnings"] == []  # no nvidia-smi is not a problem, and Linux's sysctl says no Darwin
    assert info["llama_cpp_backends"] == (["cpu"] if LLAMA_INSTALLED else [])


def test_one_nvidia_gpu(node: Hive, fake_bin: Path) -> None:
    fake_gpu.nvidia_smi(fake_bin, fake_gpu.NVIDIA_ONE_GPU)
    info = detect(node)
    cuda = [d for d in info["devices"] if d["backend"] == "cuda"]
    assert cuda == [
        {
            "backend": "cuda",
            "device": 0,
            "name": "NVIDIA GeForce RTX 3090",
            "memory_total_bytes": 24576 * MIB,
            "memory_free_bytes": 23892 * MIB,
        }
    ]
    assert info["backends"] == ["cpu", "cuda"]
    if LLAMA_INSTALLED:  # this machine's llama-cpp-python is a CPU build: say so, and how to fix it
        assert any("not built for cuda" in w and "--backend cuda" in w for w in info["warnings"])


def test_two_nvidia_gpus(node: Hive, fake_bin: Path) -> None:
    fake_gpu.nvidia_smi(fake_bin, fake_gpu.NVIDIA_TWO_GPUS)
    cuda = [d for d in detect(node)["devices"] if d["backend"] == "cuda"]
    assert [(d["device"], d["name"], d["memory_free_bytes"] // MIB) for d in cuda] == [
        (0, "NVIDIA GeForce RTX 4090", 23981),
        (1, "NVIDIA GeForce RTX 3060", 11796),
    ]


def test_a_driver_error_means_no_cuda_and_a_warning(node: Hive, fake_bin: Path) -> None:
    fake_gpu.nvidia_smi(fake_bin, fake_gpu.NVIDIA_DRIVER_ERROR, exit_code=9)
    info = detect(node)
    assert info["backends"] == ["cpu"]
    assert any("exit 9" in w and "couldn't communicate with the NVIDIA driver" in w for w in info["warnings"])


def test_a_hung_nvidia_smi_is_abandoned(node: Hive, fake_bin: Path) -> None:
    fake_gpu.hung_nvidia_smi(fake_bin)
    info = node.ok("detect", "--timeout", "0.5")
    assert info["backends"] == ["cpu"]
    assert info["warnings"] == ["nvidia-smi did not answer within 0.5 s; CUDA devices unknown"]


def test_apple_silicon_has_metal_on_unified_memory(node: Hive, fake_bin: Path) -> None:
    fake_gpu.sysctl(fake_bin, fake_gpu.APPLE_SILICON)
    info = detect(node)
    metal = [d for d in info["devices"] if d["backend"] == "metal"]
    assert len(metal) == 1 and metal[0]["name"] == "Apple M2 Pro" and metal[0]["device"] == 0
    assert metal[0]["memory_total_bytes"] == 34359738368
    # what Metal can wire: at most two thirds of it, and never more than is free
    assert 0 < metal[0]["memory_free_bytes"] <= 34359738368 * 2 // 3
    assert metal[0]["memory_free_bytes"] <= psutil.virtual_memory().total


def test_an_intel_mac_has_no_metal_backend(node: Hive, fake_bin: Path) -> None:
    fake_gpu.sysctl(fake_bin, fake_gpu.INTEL_MAC)
    assert detect(node)["backends"] == ["cpu"]


def test_detect_text_is_a_table(node: Hive, fake_bin: Path) -> None:
    import subprocess

    from .conftest import HIVE

    fake_gpu.nvidia_smi(fake_bin, fake_gpu.NVIDIA_TWO_GPUS)
    out = subprocess.run(
        [*HIVE, "detect", "--home", str(node.home)], env=node.env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "cuda:1" in out.stdout and "NVIDIA GeForce RTX 3060" in out.stdout and "12884.9 MB" in out.stdout


def test_unreadable_nvidia_smi_rows_become_warnings() -> None:
    devices, warnings = parse_nvidia_smi("0, Tesla T4, 15360, 15101\n1, GH200, [N/A], [N/A]\n\n")
    assert [(d.device, d.name) for d in devices] == [(0, "Tesla T4")]
    assert len(warnings) == 1 and "[N/A]" in warnings[0]
    devices, _ = parse_nvidia_smi("2, NVIDIA A100-SXM4-80GB, Rev 2, 81920, 81000\n")  # a comma in a name
    assert devices[0].name == "NVIDIA A100-SXM4-80GB, Rev 2" and devices[0].memory_total_bytes == 81920 * MIB


# --- refusals at spawn -------------------------------------------------------------


def assert_nothing_started(hive: Hive, logs: bool = True) -> None:
    """No worker known, recorded or running (and, with `logs`, none ever started)."""
    assert hive.ok("worker", "list")["workers"] == []
    assert list((hive.home / "workers").iterdir()) == []
    assert not logs or not list((hive.home / "logs").glob("worker-*.log"))
    daemon = hive.daemon_pid
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        assert not (proc.info["pid"] != daemon and "rbee_worker.cli" in cmd and str(hive.home) in cmd), cmd


def test_a_spawn_too_big_for_ram_is_refused_with_the_numbers(node: Hive, tiny_model: Path) -> None:
    node.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    node.start(*PORTS)
    err = node.run("worker", "spawn", "--model", "tiny", "--slots", "1000", "--ctx", "100000", "--wait").error
    assert err["code"] == "INSUFFICIENT_RAM", err
    d = err["details"]
    # tiny: 2 layers × 4 KV heads × (16 + 16) × 2 bytes = 512 bytes per token; 10^8 tokens
    assert d["kv_bytes"] == 2 * 4 * 32 * 2 * 100_000_000
    assert d["required_bytes"] > d["available_bytes"] > 0
    assert f"need {-(-d['required_bytes'] // MIB)} MB" in err["message"]
    assert f"have {d['available_bytes'] // MIB} MB free" in err["message"]
    assert "1000 slot(s) × ctx 100000" in err["message"] and "--slots" in err["hint"]
    assert_nothing_started(node)


def test_cuda_on_a_node_without_it_is_refused(node: Hive, tiny_model: Path) -> None:
    node.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    node.start(*PORTS)
    err = node.run("worker", "spawn", "--model", "tiny", "--backend", "cuda").error
    assert err["code"] == "BACKEND_NOT_AVAILABLE"
    assert "backend cuda is not available on this node (available: cpu)" in err["message"]
    assert err["hint"] == "--backend cpu"
    err = node.run("worker", "spawn", "--model", "tiny", "--backend", "cpu", "--device", "1").error
    assert err["code"] == "BACKEND_NOT_AVAILABLE" and "cpu device 1 is not available" in err["message"]
    assert_nothing_started(node)


@pytest.mark.llama
def test_cuda_with_a_cpu_build_of_llama_cpp_names_the_install_command(
    node: Hive, fake_bin: Path, tiny_model: Path
) -> None:
    fake_gpu.nvidia_smi(fake_bin, fake_gpu.NVIDIA_TWO_GPUS)
    node.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    node.start(*PORTS)
    err = node.run("worker", "spawn", "--model", "tiny", "--backend", "cuda", "--device", "1").error
    assert err["code"] == "BACKEND_NOT_AVAILABLE"
    assert "llama-cpp-python on this node was built for cpu, not cuda" in err["message"]
    assert err["hint"] == "rbee-keeper setup install --node <node> --extras llama --backend cuda"
    # the ctransformers runtime never runs on a GPU, whatever the build
    err = node.run(
        "worker", "spawn", "--model", "tiny", "--runtime", "ctransformers", "--backend", "cuda"
    ).error
    assert err["code"] == "BACKEND_NOT_AVAILABLE" and "CPU only" in err["message"]
    assert_nothing_started(node)
    # `auto` on this node: a GPU the build cannot drive is not used, and a warning says why
    spawned = node.ok("worker", "spawn", "--model", "tiny", "--wait")
    assert spawned["backend"] == "cpu" and spawned["device"] is None and spawned["gpu_layers"] == 0
    assert "not built for cuda" in node.log()
    node.ok("worker", "stop", spawned["id"])
    assert_nothing_started(node, logs=False)


@pytest.mark.llama
@pytest.mark.slow
def test_a_planned_smollm2_worker_reports_where_it_runs(node: Hive, smollm2: Path) -> None:
    from rbee_worker.model_shape import read_model_shape
    from rbee_worker.planning import plan_memory

    node.ok("models", "add", f"file:{smollm2}", "--name", "smol")
    node.start(*PORTS)
    spawned = node.ok("worker", "spawn", "--model", "smol", "--slots", "2", "--gpu-layers", "all", "--wait")
    plan = plan_memory(read_model_shape(smollm2), backend="cpu", slots=2)  # ctx: min(8192, 4096)
    assert plan.ctx == 4096 and spawned["planned_bytes"] == plan.total_bytes
    assert (spawned["runtime"], spawned["backend"], spawned["device"]) == ("llama-cpp", "cpu", None)
    assert spawned["gpu_layers"] == 0 and spawned["vram_bytes"] == 0  # nothing to offload to on a CPU
    assert f"--ctx {plan.ctx}" in " ".join(psutil.Process(spawned["pid"]).cmdline())
    node.ok("worker", "stop", spawned["id"])
    assert_nothing_started(node, logs=False)
