"""What every part of the report shares: the report model, verdicts, plots, sshd nodes, a keeper fleet."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from bench import worker_overhead as wo
from tests import sshd
from tests.keeper import conftest as keeper_fixtures

REPO = Path(__file__).resolve().parents[2]
#: Ports for the workers of the hives started here (keeper tests use 8800–8899, other suites 8700–8799).
HIVE_ENV = {"RBEE_HIVE_PORT_MIN": "8930", "RBEE_HIVE_PORT_MAX": "8999"}
NOISE = 0.03  # a ratio within 3 % of its target is shown as "≈" (within this machine's run-to-run noise)
RUN_TIMEOUT = 180.0


@dataclasses.dataclass
class Row:
    """One line of the summary: a measured figure, its ratio to the baseline, the target, the verdict."""

    what: str
    measured: str
    ratio: str
    target: str
    verdict: str = "—"


@dataclasses.dataclass
class Section:
    key: str
    title: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    body: list[str] = dataclasses.field(default_factory=list)
    image: str | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclasses.dataclass
class Context:
    tmp: Path
    img_dir: Path
    img_prefix: str  # how the markdown refers to img_dir
    quick: bool
    sshd: SshdPool

    def reps(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def at_least(value: float, target: float) -> str:
    if not math.isfinite(value):
        return "—"
    if value >= target:
        return "✅"
    return "≈" if value >= target * (1 - NOISE) else "❌"


def at_most(value: float, target: float) -> str:
    if not math.isfinite(value):
        return "—"
    if value <= target:
        return "✅"
    return "≈" if value <= target * (1 + NOISE) else "❌"


def below(value: float, target: float) -> str:
    return "✅" if math.isfinite(value) and value < target else ("—" if not math.isfinite(value) else "❌")


def med(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def spread(values: Sequence[float], digits: int = 1) -> str:
    """All values in run order, for reading the noise behind a median."""
    return ", ".join(fmt(v, digits) for v in values)


def plt_module() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(ctx: Context, fig: Any, name: str, section: Section) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "pair":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = ctx.img_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt_module().close(fig)
    section.image = f"{ctx.img_prefix}/{name}"


def log(message: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class SshdPool:
    """sshd nodes on loopback addresses, started on first use, with this report's hive port range."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._factory: sshd.SshdFactory | None = None
        self.nodes: dict[str, sshd.SshdNode] = {}

    def get(self, address: str) -> sshd.SshdNode:
        if address not in self.nodes:
            if self._factory is None:
                self._factory = sshd.SshdFactory(self.base)
            self.nodes[address] = self._factory.start(address).set_env(HIVE_ENV)
        return self.nodes[address]

    def close(self) -> None:
        if self._factory is not None:
            self._factory.close()


@dataclasses.dataclass
class KeeperFleet:
    keeper: keeper_fixtures.Keeper
    homes: Path
    inventory: Path


def make_fleet(base: Path, nodes: dict[str, sshd.SshdNode], *, local: bool) -> KeeperFleet:
    """An inventory of `nodes` (plus `local` when asked), fresh homes, its own keeper config dir."""
    base.mkdir(parents=True, exist_ok=True)
    homes = base / "homes"
    inventory = sshd.write_inventory(
        base / "inventory.yaml", nodes, homes, local_node="local" if local else None, venv=Path(sys.prefix)
    )
    keeper = keeper_fixtures.make_keeper(base, inventory, **HIVE_ENV)
    sshd.trust_nodes(keeper.config_dir, nodes.values())
    return KeeperFleet(keeper, homes, inventory)


def stop_hives(fleet: KeeperFleet) -> None:
    """`hive stop --all`, then kill (by pid) any hive or worker of these homes that is left."""
    with contextlib.suppress(Exception):
        fleet.keeper.run("hive", "stop", "--all", timeout=120)
    deadline = time.monotonic() + 15
    left = keeper_fixtures.rbee_processes(fleet.homes)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = keeper_fixtures.rbee_processes(fleet.homes)
    for proc in left:
        with contextlib.suppress(Exception):
            proc.kill()


def smollm2() -> Path:
    return wo.smollm2_path()  # found with importlib.util.find_spec, the package is never imported


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def command_seconds(argv: list[str]) -> float:
    """Wall time of one command that must succeed, output discarded."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - started


def ssh_version() -> str:
    got = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    return (got.stderr or got.stdout).split(",")[0].strip()


def sshd_cpu(nodes: Sequence[sshd.SshdNode]) -> float:
    """CPU seconds of these sshd listeners and every process under them that has been reaped.

    Each sshd waits for its per-connection child, which waits for the session and the command
    (`rbee-hive status`, `sftp-server`), so their CPU time ends up in the listener's children times.
    """
    total = 0.0
    for node in nodes:
        if node.process is None:
            continue
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(node.process.pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total
