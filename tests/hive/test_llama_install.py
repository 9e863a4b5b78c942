"""Which llama-cpp-python build a node gets, from what `detect` found there.

The flag choice is pure and fed `detect` output of the machines in `fake_gpu`; the
CLI is run for real with captured `nvidia-smi` / `sysctl` and a stand-in `nvcc`
on PATH, in `--dry-run` (a CUDA build takes tens of minutes and needs a GPU to
mean anything). The real install from the wheel cache runs in tests/keeper.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_control.hive.devices import Device, NodeDevices
from rbee_control.hive.llama_install import choose_build, pip_command
from rbee_worker.protocol.errors import RbeeError

from .. import fake_gpu
from .conftest import Hive, hive_env
from .servers import FileServer

GIB = 1 << 30
CPU = Device("cpu", 0, "16 cores", 64 * GIB, 60 * GIB)
RTX = Device("cuda", 0, "NVIDIA GeForce RTX 3090", 24 * GIB, 23 * GIB)
M2 = Device("metal", 0, "Apple M2 Pro", 32 * GIB, 21 * GIB)


def node(*devices: Device, nvcc: str | None = None, built: list[str] | None = None) -> NodeDevices:
    return NodeDevices([CPU, *devices], 16, built or [], cuda_toolkit=nvcc)


def test_flags_follow_the_hardware() -> None:
    assert choose_build(node()).cmake_args == "-DGGML_NATIVE=OFF"
    cuda = choose_build(node(RTX, nvcc="/usr/local/cuda/bin/nvcc"))
    assert (cuda.backend, cuda.cmake_args) == ("cuda", "-DGGML_CUDA=on") and "RTX 3090" in cuda.reason
    assert choose_build(node(M2)).cmake_args == "-DGGML_METAL=on"
    no_toolkit = choose_build(node(RTX))
    assert no_toolkit.backend == "cpu" and "no CUDA toolkit (nvcc)" in no_toolkit.reason
    assert choose_build(node(RTX, nvcc="/x/nvcc"), "cpu").cmake_args == "-DGGML_NATIVE=OFF"


def test_forced_builds_the_node_cannot_make_are_refused() -> None:
    with pytest.raises(RbeeError, match="needs the CUDA toolkit"):
        choose_build(node(RTX), "cuda")
    with pytest.raises(RbeeError, match="Apple Silicon"):
        choose_build(node(RTX, nvcc="/x/nvcc"), "metal")
    with pytest.raises(RbeeError, match="invalid backend"):
        choose_build(node(), "rocm")
    # a driver that is down does not stop a CUDA build the operator asked for
    forced = choose_build(node(nvcc="/x/nvcc"), "cuda")
    assert forced.cmake_args == "-DGGML_CUDA=on" and "driver may be down" in forced.reason


def test_pip_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_WHEEL_CACHE", str(tmp_path))
    argv, env = pip_command(choose_build(node()), installed=[])
    # every build also gets the RPC backend (split workers), on top of the chosen flags
    assert env["CMAKE_ARGS"] == "-DGGML_NATIVE=OFF -DGGML_RPC=ON"
    assert argv[argv.index("--find-links") + 1] == str(tmp_path)
    assert "--force-reinstall" not in argv and argv[-1].startswith("llama-cpp-python==")
    argv, _ = pip_command(choose_build(node()), installed=["cpu", "cuda"])  # replacing a CUDA build
    assert "--force-reinstall" in argv
    argv, _ = pip_command(choose_build(node()), installed=["cpu"], rpc_installed=False)  # a build without RPC
    assert "--force-reinstall" in argv
    argv, env = pip_command(choose_build(node(RTX, nvcc="/x/nvcc")), installed=["cpu"])
    assert env["CMAKE_ARGS"] == "-DGGML_CUDA=on -DGGML_RPC=ON" and "--find-links" not in argv
    assert argv[argv.index("--no-binary") + 1] == "llama-cpp-python" and "--no-cache-dir" in argv


@pytest.fixture
def fake_node(tmp_path: Path, file_server: FileServer) -> tuple[Hive, Path]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    return Hive(tmp_path / "home", fake_gpu.with_path(hive_env(tmp_path, file_server), bin_dir)), bin_dir


def fake_nvcc(bin_dir: Path) -> None:
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)


def test_dry_run_on_a_cuda_box(fake_node: tuple[Hive, Path]) -> None:
    hive, bin_dir = fake_node
    fake_gpu.nvidia_smi(bin_dir, fake_gpu.NVIDIA_ONE_GPU)
    fake_nvcc(bin_dir)
    run = hive.run("install-llama", "--dry-run")
    plan = run.result
    assert plan["backend"] == "cuda" and plan["cmake_args"] == "-DGGML_CUDA=on" and plan["dry_run"] is True
    assert str(bin_dir / "nvcc") in plan["reason"] and "--no-binary" in plan["command"]
    assert any(
        "CMAKE_ARGS=-DGGML_CUDA=on" in e.data.get("message", "") for e in run.events if e.event == "log"
    )
    assert not (hive.home / "llama-build.json").exists()  # a dry run records nothing


def test_dry_run_on_apple_silicon_and_refusals(fake_node: tuple[Hive, Path]) -> None:
    hive, bin_dir = fake_node
    fake_gpu.sysctl(bin_dir, fake_gpu.APPLE_SILICON)
    assert hive.run("install-llama", "--dry-run").result["cmake_args"] == "-DGGML_METAL=on"
    fake_gpu.sysctl(bin_dir, fake_gpu.INTEL_MAC)
    err = hive.run("install-llama", "--dry-run", "--backend", "metal").error
    assert err["code"] == "BACKEND_NOT_AVAILABLE" and "Apple Silicon" in err["message"]
