"""`rbee-keeper setup install` on a real sshd node whose home has no rbee at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import sshd

from .conftest import HIVE_ENV, Keeper, make_keeper, stop_fleet


@pytest.mark.slow
def test_install_builds_pushes_and_runs_from_the_node_venv(
    keeper_sshd_nodes: list[sshd.SshdNode], tmp_path: Path
) -> None:
    node = keeper_sshd_nodes[0]
    home = tmp_path / "homes" / "fresh"
    inventory = sshd.write_inventory(
        tmp_path / "inventory.yaml", {"fresh": node}, tmp_path / "homes", local_node=None
    )
    keeper: Keeper = make_keeper(tmp_path, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    assert not (home / "venv").exists()

    before = keeper.run("hive", "status", "--node", "fresh")
    assert before.rc == 1 and "setup install --node fresh" in before.err, before

    first = keeper.run("setup", "install", "--node", "fresh", timeout=900)
    assert first.rc == 0, first
    assert "fresh: rbee-hive" in first.err, first
    venv_python = home / "venv" / "bin" / "python"
    assert venv_python.exists() and venv_python.resolve() != Path(sys.executable).resolve()
    assert (home / "venv" / "bin" / "rbee-worker").exists()

    again = keeper.run("setup", "install", "--node", "fresh", timeout=900)
    assert again.rc == 0, again  # idempotent: same venv, same version

    status = keeper.run("hive", "start", "--node", "fresh")
    assert status.rc == 0, status
    stop_fleet(keeper, tmp_path / "homes")


@pytest.mark.slow
@pytest.mark.llama
def test_install_with_llama_builds_for_what_the_node_has(
    keeper_sshd_nodes: list[sshd.SshdNode], tmp_path: Path
) -> None:
    """This node has no GPU: the CPU flags, from the wheel cache (a build from source takes minutes)."""
    from rbee_control.hive.llama_install import LLAMA_VERSION, wheel_cache

    assert list(wheel_cache().glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl")), "run scripts/setup.sh first"
    node = keeper_sshd_nodes[1]
    home = tmp_path / "homes" / "gpu-less"
    inventory = sshd.write_inventory(
        tmp_path / "inventory.yaml", {"gpu-less": node}, tmp_path / "homes", local_node=None
    )
    keeper: Keeper = make_keeper(tmp_path, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])

    run = keeper.run("setup", "install", "--node", "gpu-less", "--extras", "llama", timeout=1200)
    assert run.rc == 0, run
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF" in run.err and "(no GPU found)" in run.err, run
    assert f"llama-cpp-python {LLAMA_VERSION} for cpu (-DGGML_NATIVE=OFF)" in run.err, run
    record = json.loads((home / "llama-build.json").read_text())
    assert (record["backend"], record["cmake_args"]) == ("cpu", "-DGGML_NATIVE=OFF")
    assert "--find-links" in record["command"] and "--no-binary" not in record["command"]

    detect = keeper.run("hive", "detect", "--node", "gpu-less", json_mode=True)
    assert detect.rc == 0, detect
    found = detect.json()["gpu-less"]
    assert found["llama_cpp_backends"] == ["cpu"]
    assert found["llama_cpp_build"]["cmake_args"] == "-DGGML_NATIVE=OFF"
    venv_python = home / "venv" / "bin" / "python"
    probe = subprocess.run(
        [str(venv_python), "-c", "import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.stdout.strip() == "False", probe.stderr

    again = keeper.run(
        "setup", "install", "--node", "gpu-less", "--extras", "llama", "--backend", "cpu", timeout=1200
    )
    assert again.rc == 0 and "already installed" in again.err, again
    stop_fleet(keeper, tmp_path / "homes")


@pytest.mark.slow
def test_install_into_a_home_given_with_tilde(sshd_factory: sshd.SshdFactory, tmp_path: Path) -> None:
    """`home: ~/rbee` means the node user's home: the venv must not land in `$HOME/~/rbee`."""
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    node = sshd_factory.start("127.0.0.5").set_env({"HOME": str(user_home), **HIVE_ENV})
    inventory = tmp_path / "inventory.yaml"
    ssh = f"host: {node.host}, port: {node.port}, user: {node.user}, key: '{node.client_key}'"
    inventory.write_text(f"nodes:\n  tilde:\n    ssh: {{{ssh}}}\n    home: ~/rbee\n")
    keeper = make_keeper(tmp_path, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    try:
        run = keeper.run("setup", "install", "--node", "tilde", timeout=900)
        assert run.rc == 0, run
        assert (user_home / "rbee" / "venv" / "bin" / "rbee-hive").exists()
        assert not (user_home / "~").exists(), "the ~ was quoted and created literally"
        started = keeper.run("hive", "start", "--node", "tilde")
        assert started.rc == 0, started
        assert (user_home / "rbee" / "hive.pid").exists()
        stop_fleet(keeper, user_home)
    finally:
        node.stop()
