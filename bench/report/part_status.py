"""Part 5: `rbee-keeper status` fanned out over 1/2/4/8 sshd nodes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rbee_control.inventory.loader import load_inventory
from rbee_control.node import NodeClient
from rbee_control.ssh.known_hosts import KnownHosts
from rbee_control.ssh.pool import TransportPool
from tests import sshd

from .common import (
    RUN_TIMEOUT,
    Context,
    KeeperFleet,
    Row,
    Section,
    at_most,
    children_cpu,
    log,
    make_fleet,
    med,
    plt_module,
    save_figure,
    self_cpu,
    spread,
    sshd_cpu,
    stop_hives,
    table,
)

STATUS_ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 10))
STATUS_SIZES = (1, 2, 4, 8)


@dataclasses.dataclass
class FanOut:
    wall: float
    connect: float  # the slowest node's connect
    command: float  # the slowest node's `rbee-hive status` once connected
    cpu: float  # CPU seconds: this process + the sshd trees (connections, shells, rbee-hive)


async def fan_out_status(
    inventory_path: Path, known_hosts: Path
) -> tuple[float, dict[str, tuple[float, float]]]:
    """In process, as `rbee-keeper status` does it: connect to every node and ask its hive, all at once."""
    inventory = load_inventory(inventory_path)
    per_node: dict[str, tuple[float, float]] = {}
    started = time.perf_counter()
    async with TransportPool(inventory, known_hosts=KnownHosts(known_hosts)) as pool:

        async def one(name: str) -> None:
            t0 = time.perf_counter()
            transport = await pool.get(name)
            t1 = time.perf_counter()
            info = await NodeClient(inventory.node(name), transport).hive_status()
            if not info.get("running"):
                raise RuntimeError(f"hive on {name} is not running: {info}")
            per_node[name] = (t1 - t0, time.perf_counter() - t1)

        await asyncio.gather(*(one(node.name) for node in inventory))
    return time.perf_counter() - started, per_node


def measure_fan_out(fleet: KeeperFleet, all_nodes: Sequence[sshd.SshdNode]) -> FanOut:
    cpu0 = self_cpu() + sshd_cpu(all_nodes)
    wall, each = asyncio.run(
        asyncio.wait_for(fan_out_status(fleet.inventory, fleet.keeper.config_dir / "known_hosts"), 120)
    )
    time.sleep(0.3)  # let the sshd processes of the closed connections exit and be reaped
    cpu = self_cpu() + sshd_cpu(all_nodes) - cpu0
    return FanOut(wall, max(c for c, _ in each.values()), max(r for _, r in each.values()), cpu)


def part_status(ctx: Context) -> Section:
    section = Section("status", "5. `rbee-keeper status` fan-out over 1/2/4/8 sshd nodes")
    base = ctx.tmp / "status"
    nodes = {f"s{i + 2}": ctx.sshd.get(address) for i, address in enumerate(STATUS_ADDRESSES)}
    names = list(nodes)
    fleets = {
        n: make_fleet(base / f"k{n}", {k: nodes[k] for k in names[:n]}, local=False) for n in STATUS_SIZES
    }
    # one set of homes for every inventory: point each inventory's homes at the 8-node fleet's
    largest = fleets[max(STATUS_SIZES)]
    for n, fleet in fleets.items():
        if n != max(STATUS_SIZES):
            text = fleet.inventory.read_text().replace(str(fleet.homes), str(largest.homes))
            fleet.inventory.write_text(text)
    reps = ctx.reps(5, 2)
    cli: dict[int, list[float]] = {n: [] for n in STATUS_SIZES}
    fan: dict[int, list[FanOut]] = {n: [] for n in STATUS_SIZES}
    try:
        started = largest.keeper.run("hive", "start", "--all", timeout=RUN_TIMEOUT)
        if started.rc != 0:
            raise RuntimeError(f"hive start --all failed:\n{started}")
        for rep in range(reps):
            order = list(STATUS_SIZES[rep % 4 :] + STATUS_SIZES[: rep % 4])
            if rep % 2:
                order.reverse()
            for n in order:
                run = fleets[n].keeper.run("status", json_mode=True, timeout=RUN_TIMEOUT)
                if run.rc != 0 or not all(v.get("running") for v in run.json().values()):
                    raise RuntimeError(f"status over {n} nodes failed:\n{run}")
                cli[n].append(run.seconds)
                fan[n].append(measure_fan_out(fleets[n], list(nodes.values())))
            log(f"status: repetition {rep + 1}/{reps} done")
        # what one node's `rbee-hive status --json` costs in CPU (it is a Python process on the node)
        home = largest.homes / names[0]
        cpu = []
        for _ in range(3):
            before = children_cpu()
            subprocess.run(
                [str(Path(sys.prefix) / "bin" / "rbee-hive"), "--home", str(home), "--json", "status"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            cpu.append(children_cpu() - before)
    finally:
        stop_hives(largest)
    cores = os.cpu_count() or 1
    one_cli, one_fan = med(cli[1]), med([f.wall for f in fan[1]])
    detail = []
    for n in STATUS_SIZES:
        walls = [f.wall for f in fan[n]]
        ratio_cli = med([a / b for a, b in zip(cli[n], cli[1], strict=True)])
        ratio_fan = med([a.wall / b.wall for a, b in zip(fan[n], fan[1], strict=True)])
        if n > 1:
            section.rows.append(
                Row(
                    f"{n} nodes vs 1: `rbee-keeper status` wall",
                    f"{med(cli[n]):.2f} vs {one_cli:.2f} s",
                    f"{ratio_cli:.2f}×",
                    "≈ 1× one node (≤ 1.5×)",
                    at_most(ratio_cli, 1.5),
                )
            )
            section.rows.append(
                Row(
                    f"{n} nodes vs 1: the fan-out alone (in process: connect + `rbee-hive status`)",
                    f"{med(walls):.2f} vs {one_fan:.2f} s",
                    f"{ratio_fan:.2f}×",
                    "≈ 1× one node (≤ 1.5×)",
                    at_most(ratio_fan, 1.5),
                )
            )
        fan_cpu = med([f.cpu for f in fan[n]])
        detail.append(
            [n, f"{med(cli[n]):.2f}", f"{ratio_cli:.2f}", f"{med(walls):.2f}", f"{ratio_fan:.2f}",
             f"{med([f.connect for f in fan[n]]):.2f}", f"{med([f.command for f in fan[n]]):.2f}",
             f"{fan_cpu:.2f}", f"{fan_cpu / cores:.2f}", f"{n * one_fan:.2f}", spread(cli[n], 2),
             spread(walls, 2)]
        )  # fmt: skip
    cpu_one = med(cpu)
    section.body.append(
        "Eight real sshd processes on 127.0.0.2…127.0.0.9, each node its own home with a running hive. "
        "`status` runs `rbee-hive status --json` on every node over its own SSH connection, concurrently. "
        "*CLI* is the whole `rbee-keeper --json status` process; *fan-out* is the same work in this "
        "process (`TransportPool` + `NodeClient.hive_status`, connect included) without the keeper's "
        "start-up, split into the slowest node's connect and command. *CPU* is what one fan-out "
        "consumed on this machine: this process plus the sshd trees (connections, shells, `rbee-hive`); "
        f"divided by the {cores} cores it is the least wall time the fan-out can take here. "
        f"{reps} repetitions, the order of N rotated per repetition; ratios are medians of "
        f"per-repetition ratios. One `rbee-hive status --json` alone costs {cpu_one:.2f} CPU-seconds "
        "(median of 3; a Python process importing rbee)."
    )
    section.body.append(
        table(
            ["nodes", "CLI wall s", "CLI / 1 node", "fan-out s", "fan-out / 1 node", "slowest connect s",
             "slowest command s", "CPU s", f"CPU / {cores} cores s", "N × one node (serial) s",
             "CLI per repetition", "fan-out per repetition"],
            detail,
        )
    )  # fmt: skip
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(STATUS_SIZES, [med(cli[n]) for n in STATUS_SIZES], "o-", label="rbee-keeper status (wall)")
    ax.plot(
        STATUS_SIZES, [med([f.wall for f in fan[n]]) for n in STATUS_SIZES], "s-", label="fan-out in process"
    )
    ax.plot(STATUS_SIZES, [one_fan] * len(STATUS_SIZES), ":", label="target: one node's fan-out time")
    ax.plot(STATUS_SIZES, [n * one_fan for n in STATUS_SIZES], "--", label="serial: N × one node")
    ax.plot(
        STATUS_SIZES, [med([f.cpu for f in fan[n]]) / cores for n in STATUS_SIZES], "-.",
        label=f"CPU floor: fan-out CPU-seconds / {cores} cores",
    )  # fmt: skip
    ax.set_xticks(STATUS_SIZES)
    ax.set_xlabel("nodes")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.set_title("status fan-out over sshd nodes on loopback")
    ax.legend(fontsize=8)
    save_figure(ctx, fig, "bench-status.png", section)
    return section
