"""`rbee-keeper hive detect` and the devices column of `status`, over a local node and real sshd nodes.

The sshd nodes report this machine as it is (a CPU, no GPU). The local node runs
its hive commands in the keeper's environment, so a captured `nvidia-smi` first
on PATH makes it a two-GPU workstation for the length of one command.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests import fake_gpu

from .conftest import Fleet

MIB = 1 << 20


def two_gpus(tmp_path: Path) -> dict[str, str]:
    fake_gpu.nvidia_smi(tmp_path / "bin", fake_gpu.NVIDIA_TWO_GPUS)
    return {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def test_detect_over_ssh_and_locally(fleet: Fleet, tmp_path: Path) -> None:
    keeper = fleet.keeper
    run = keeper.run("hive", "detect", "--node", "n2", json_mode=True)
    assert run.rc == 0, run
    n2 = run.json()["n2"]
    assert [d["backend"] for d in n2["devices"]] == ["cpu"] and n2["devices"][0]["memory_total_bytes"] > 0

    local = keeper.run("hive", "detect", "--node", "local", json_mode=True, env=two_gpus(tmp_path))
    assert local.rc == 0, local
    devices = local.json()["local"]["devices"]
    assert [(d["backend"], d["device"]) for d in devices] == [("cpu", 0), ("cuda", 0), ("cuda", 1)]
    assert devices[2]["name"] == "NVIDIA GeForce RTX 3060" and devices[2]["memory_total_bytes"] == 12288 * MIB

    human = keeper.run("hive", "detect", "--all", env=two_gpus(tmp_path))
    assert human.rc == 0, human
    rows = [line for line in human.out.splitlines() if "│" in line]
    gpu_row = [r for r in rows if "local" in r and "cuda:1" in r]
    assert gpu_row and "NVIDIA GeForce RTX 3060" in gpu_row[0] and "12.9 GB" in gpu_row[0], human.out
    assert any("n3" in r and "cpu:0" in r for r in rows), human.out


def test_status_shows_each_nodes_devices(fleet: Fleet, tmp_path: Path) -> None:
    run = fleet.keeper.run("status", env=two_gpus(tmp_path))
    assert run.rc == 0, run
    rows = {line.split("│")[1].strip(): line for line in run.out.splitlines() if line.count("│") > 3}
    assert "devices" in run.out
    assert "cuda:0 25.1 GB/25.8 GB" in rows["local"] and "cuda:1 12.4 GB/12.9 GB" in rows["local"]
    assert "cpu (" in rows["n2"] and "cuda" not in rows["n2"]
    status = fleet.keeper.run("status", "--node", "local", json_mode=True, env=two_gpus(tmp_path)).json()
    assert [d["backend"] for d in status["local"]["node"]["devices"]] == ["cpu", "cuda", "cuda"]
