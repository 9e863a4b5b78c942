"""`rbee-keeper setup install` on real sshd nodes, starting from a home that has no rbee at all.

A full install of rbee's dependencies into a fresh venv costs minutes on a busy two-core machine,
so the module pays for it once: `installed` is one fresh install, and the other tests install on
top of that venv (the llama extra, a `~` home that names the same directory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import sshd

from .conftest import HIVE_ENV, Keeper, Run, make_keeper, stop_fleet

GPU_OFFLOAD_PROBE = "from rbee_worker.runtimes.llama_devices import supports_gpu_offload as s; print(s())"


@dataclass
class Installed:
    """The fresh install: node `fresh` with home `<user_home>/rbee`, and what the keeper said."""

    keeper: Keeper
    node: sshd.SshdNode
    user_home: Path
    before: Run
    first: Run

    @property
    def home(self) -> Path:
        return self.user_home / "rbee"


def write_node_inventory(path: Path, name: str, node: sshd.SshdNode, home: str) -> Path:
    ssh = f"host: {node.host}, port: {node.port}, user: {node.user}, key: '{node.client_key}'"
    path.write_text(f"nodes:\n  {name}:\n    ssh: {{{ssh}}}\n    home: {home}\n")
    return path


@pytest.fixture(scope="module")
def installed(
    keeper_sshd_nodes: list[sshd.SshdNode], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("install")
    node = keeper_sshd_nodes[0]
    user_home = base / "user-home"
    user_home.mkdir()
    inventory = write_node_inventory(base / "inventory.yaml", "fresh", node, f"'{user_home / 'rbee'}'")
    keeper = make_keeper(base, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    assert not (user_home / "rbee" / "venv").exists()
    before = keeper.run("hive", "status", "--node", "fresh")
    first = keeper.run("setup", "install", "--node", "fresh", timeout=900)
    try:
        yield Installed(keeper, node, user_home, before, first)
    finally:
        stop_fleet(keeper, user_home)


@pytest.mark.slow
def test_install_builds_pushes_and_runs_from_the_node_venv(installed: Installed) -> None:
    keeper, home, before, first = installed.keeper, installed.home, installed.before, installed.first
    assert before.rc == 1 and "setup install --node fresh" in before.err, before

    assert first.rc == 0, first
    assert "fresh: rbee-hive" in first.err, first
    venv_python = home / "venv" / "bin" / "python"
    assert venv_python.exists() and venv_python.resolve() != Path(sys.executable).resolve()
    assert (home / "venv" / "bin" / "rbee-worker").exists()

    again = keeper.run("setup", "install", "--node", "fresh", timeout=900)
    assert again.rc == 0, again  # idempotent: same venv, same version

    status = keeper.run("hive", "start", "--node", "fresh")
    assert status.rc == 0, status
    stop_fleet(keeper, installed.user_home)


@pytest.mark.slow
@pytest.mark.llama
def test_install_with_llama_builds_for_what_the_node_has(
    installed: Installed, keeper_sshd_nodes: list[sshd.SshdNode], tmp_path: Path
) -> None:
    """This node has no GPU: the CPU flags, from the wheel cache (a build from source takes minutes)."""
    from rbee_control.hive.llama_install import LLAMA_VERSION, wheel_cache

    assert installed.first.rc == 0, installed.first
    assert list(wheel_cache().glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl")), "run scripts/setup.sh first"
    node = keeper_sshd_nodes[1]  # another sshd, the same home as `fresh`
    home = installed.home
    inventory = write_node_inventory(tmp_path / "inventory.yaml", "gpu-less", node, f"'{home}'")
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
        # rbee's check, not llama.cpp's: that one also counts the RPC backend every build has
        [str(venv_python), "-c", GPU_OFFLOAD_PROBE],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.stdout.strip() == "False", probe.stderr

    again = keeper.run(
        "setup", "install", "--node", "gpu-less", "--extras", "llama", "--backend", "cpu", timeout=1200
    )
    assert again.rc == 0 and "already installed" in again.err, again
    stop_fleet(keeper, installed.user_home)


@pytest.mark.slow
def test_install_into_a_home_given_with_tilde(
    installed: Installed, sshd_factory: sshd.SshdFactory, tmp_path: Path
) -> None:
    """`home: ~/rbee` means the node user's home: the venv must not land in `$HOME/~/rbee`.

    The node user's $HOME is the one whose `rbee` the fresh install filled, so this install only
    replaces rbee itself; the script it removes first shows where the install went.
    """
    assert installed.first.rc == 0, installed.first
    user_home = installed.user_home
    hive_script = user_home / "rbee" / "venv" / "bin" / "rbee-hive"
    hive_script.unlink()
    node = sshd_factory.start("127.0.0.5").set_env({"HOME": str(user_home), **HIVE_ENV})
    inventory = write_node_inventory(tmp_path / "inventory.yaml", "tilde", node, "~/rbee")
    keeper = make_keeper(tmp_path, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    try:
        run = keeper.run("setup", "install", "--node", "tilde", timeout=900)
        assert run.rc == 0, run
        assert hive_script.exists(), "installed into ~/rbee of the node user"
        assert not (user_home / "~").exists(), "the ~ was quoted and created literally"
        started = keeper.run("hive", "start", "--node", "tilde")
        assert started.rc == 0, started
        assert (user_home / "rbee" / "hive.pid").exists()
        stop_fleet(keeper, user_home)
    finally:
        node.stop()
