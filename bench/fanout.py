"""`rbee-keeper status` over 1, 8 and 32 sshd nodes, each with a running hive: time ÷ one node.

32 real OpenSSH sshd processes on 127.0.0.2…127.0.0.33, each node its own home
whose `venv` is this interpreter's (the tests' fast install), and one hive daemon
per home, started over SSH four at a time. A running hive answers `status` on its
Unix socket, read over a streamlocal channel of the node's SSH connection, so a
node costs one SSH connect and one round trip, no process on the node.

Per repetition (the order of N rotated, reversed every other time):

- *CLI*: the wall time of a whole `rbee-keeper --json status` process with the
  keeper's connection holder already holding the N connections (what the operator
  waits for on every `status` but the first within `RBEE_SSH_PERSIST` seconds:
  start-up, N round trips through the holder, the table);
- *cold CLI*: the same right after the holder was stopped: the holder starts and
  makes N connects (the first `status` of the day);
- *fan-out*: direct connects in this process, no holder (`TransportPool` +
  `NodeClient.hive_status`, connects included), without the keeper's start-up.

Every answer must say `running` and `via: socket`, or the run stops. Ratios are
medians of per-repetition ratios. The last line is

    status 32 nodes / 1 node: X.XX

Everything listens on loopback; every sshd and hive started here is stopped on
exit, errors included. CPU-heavy on a small machine (32 hives start at once):
run it alone.

    python bench/fanout.py [--reps 5] [--sizes 1,8,32] [--markdown FILE]

`bench/report/part_fanout.py` imports `run` and renders its `FanoutResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.report.common import (  # noqa: E402
    RUN_TIMEOUT,
    KeeperFleet,
    SshdPool,
    make_fleet,
    med,
    stop_hives,
)
from rbee_control.inventory.loader import load_inventory  # noqa: E402
from rbee_control.node import NodeClient  # noqa: E402
from rbee_control.ssh.held_paths import holder_pid, stop_holder  # noqa: E402
from rbee_control.ssh.known_hosts import KnownHosts  # noqa: E402
from rbee_control.ssh.pool import TransportPool  # noqa: E402

SIZES = (1, 8, 32)
FAN_OUT_TIMEOUT = 120.0
START_AT_ONCE = 4
HIVE_START_TIMEOUT = 120.0


@dataclasses.dataclass
class FanoutResult:
    sizes: tuple[int, ...]
    cli: dict[int, list[float]]
    fan: dict[int, list[float]]
    cold: dict[int, list[float]]
    hive_start_s: float
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and at the end

    def ratio(self, n: int, which: str = "cli") -> float:
        series = {"cli": self.cli, "fan": self.fan, "cold": self.cold}[which]
        one = series[self.sizes[0]]
        return med([a / b for a, b in zip(series[n], one, strict=True)])


async def fan_out_status(inventory_path: Path, known_hosts: Path) -> float:
    """In process, as `rbee-keeper status` does it: every node at once, connect included."""
    inventory = load_inventory(inventory_path)
    started = time.perf_counter()
    async with TransportPool(inventory, known_hosts=KnownHosts(known_hosts)) as pool:

        async def one(name: str) -> None:
            info = await NodeClient(inventory.node(name), await pool.get(name)).hive_status()
            if not info.get("running") or info.get("via") != "socket":
                raise RuntimeError(f"node {name} did not answer over its socket: {info}")

        await asyncio.gather(*(one(node.name) for node in inventory))
    return time.perf_counter() - started


async def start_hives(inventory_path: Path, known_hosts: Path) -> None:
    """Every node's hive, a few at a time: 32 Python daemons importing at once on 2 cores would each
    take longer than the hive's own start-up timeout."""
    inventory = load_inventory(inventory_path)
    gate = asyncio.Semaphore(START_AT_ONCE)
    async with TransportPool(inventory, known_hosts=KnownHosts(known_hosts)) as pool:

        async def one(name: str) -> None:
            async with gate:
                client = NodeClient(inventory.node(name), await pool.get(name))
                async with asyncio.timeout(HIVE_START_TIMEOUT):
                    await client.hive_start()

        await asyncio.gather(*(one(node.name) for node in inventory))


def log(message: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(base: Path, reps: int = 5, sizes: tuple[int, ...] = SIZES) -> FanoutResult:
    largest = max(sizes)
    load_at_start = os.getloadavg()[0]
    pool = SshdPool(base / "sshd")
    fleets = {}
    try:
        log(f"starting {largest} sshd nodes")
        nodes = {f"s{i}": pool.get(f"127.0.0.{i}") for i in range(2, 2 + largest)}
        names = list(nodes)
        fleets = {n: make_fleet(base / f"k{n}", {k: nodes[k] for k in names[:n]}, local=False) for n in sizes}
        for n, fleet in fleets.items():  # the operator's default: the keeper holds its connections
            fleet.keeper.env_extra.update(RBEE_SSH_PERSIST="300", RBEE_SSH_PERSIST_DIR=str(base / f"held{n}"))
        big = fleets[largest]
        for n, fleet in fleets.items():  # one set of homes (and hives): the largest fleet's
            if n != largest:
                text = fleet.inventory.read_text().replace(str(fleet.homes), str(big.homes))
                fleet.inventory.write_text(text)
        log(f"starting {largest} hives, {START_AT_ONCE} at a time")
        t0 = time.perf_counter()
        asyncio.run(start_hives(big.inventory, big.keeper.config_dir / "known_hosts"))
        hive_start = time.perf_counter() - t0
        cli: dict[int, list[float]] = {n: [] for n in sizes}
        fan: dict[int, list[float]] = {n: [] for n in sizes}
        cold: dict[int, list[float]] = {n: [] for n in sizes}
        for rep in range(reps):
            k = rep % len(sizes)
            order = list(sizes[k:] + sizes[:k])
            if rep % 2:
                order.reverse()
            for n in order:
                if not stop_holder(base / f"held{n}"):
                    raise RuntimeError(f"the connection holder of the {n}-node keeper did not stop")
                cold[n].append(socket_status(fleets[n], n))
                if holder_pid(base / f"held{n}") is None:
                    raise RuntimeError(f"the {n}-node keeper started no connection holder")
                cli[n].append(socket_status(fleets[n], n))
                known = fleets[n].keeper.config_dir / "known_hosts"
                fanned = asyncio.wait_for(fan_out_status(fleets[n].inventory, known), FAN_OUT_TIMEOUT)
                fan[n].append(asyncio.run(fanned))
            log(f"repetition {rep + 1}/{reps}: " + ", ".join(f"{n}: {cli[n][-1]:.2f}s" for n in sizes))
        return FanoutResult(tuple(sizes), cli, fan, cold, hive_start, (load_at_start, os.getloadavg()[0]))
    finally:
        for n in sizes:
            stop_holder(base / f"held{n}")
        if largest in fleets:
            stop_hives(fleets[largest])
        pool.close()


def socket_status(fleet: KeeperFleet, n: int) -> float:
    """One `rbee-keeper --json status`; its wall time once every node answered over its socket."""
    status = fleet.keeper.run("status", json_mode=True, timeout=RUN_TIMEOUT)
    answers = status.json().values() if status.rc == 0 else []
    if status.rc != 0 or not all(a.get("via") == "socket" for a in answers):
        raise RuntimeError(f"status over {n} nodes did not answer over the sockets:\n{status}")
    return status.seconds


def report(result: FanoutResult) -> str:
    one = result.sizes[0]
    head = f"{'nodes':>5}  {'CLI s':>7}  {'CLI / 1':>7}  {'cold s':>7}  {'cold / 1':>8}"
    lines = [f"{head}  {'fan-out s':>9}  {'fan-out / 1':>11}  CLI per repetition"]
    for n in result.sizes:
        lines.append(
            f"{n:>5}  {med(result.cli[n]):>7.2f}  {result.ratio(n):>7.2f}  {med(result.cold[n]):>7.2f}  "
            f"{result.ratio(n, 'cold'):>8.2f}  {med(result.fan[n]):>9.2f}  "
            f"{result.ratio(n, 'fan'):>11.2f}  {', '.join(f'{s:.2f}' for s in result.cli[n])}"
        )
    lines.append(
        f"({max(result.sizes)} hives started in {result.hive_start_s:.1f} s; "
        f"load average {result.load[0]:.1f} at the start, {result.load[1]:.1f} at the end)"
    )
    for n in result.sizes[1:]:
        lines.append(f"first status (holder starting) {n} nodes / {one} node: {result.ratio(n, 'cold'):.2f}")
    for n in result.sizes[1:]:
        lines.append(f"status {n} nodes / {one} node: {result.ratio(n):.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated, smallest first")
    parser.add_argument("--markdown", type=Path, help="also write the report section (markdown) here")
    args = parser.parse_args()
    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes: not a comma-separated list of counts: {args.sizes!r}")
    increasing = bool(sizes) and sizes == tuple(sorted(set(sizes))) and sizes[0] >= 1 and sizes[-1] <= 200
    if not increasing or not 1 <= args.reps <= 50:
        parser.error("--sizes must be increasing counts from 1 to 200; --reps 1 to 50")
    with tempfile.TemporaryDirectory(prefix="rbee-fanout-") as tmp:
        result = run(Path(tmp), args.reps, sizes)
    if args.markdown:
        from bench.report.part_fanout import section_markdown

        args.markdown.write_text(section_markdown(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
