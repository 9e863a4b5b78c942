"""Every rbee benchmark side by side in one run on this machine, written to docs/benchmarks.md.

    python bench/report.py                      # all parts (~10 min on 2 busy cores)
    python bench/report.py --only status,sftp   # some parts; markdown on stdout, plots in a temp dir
    python bench/report.py --only relay --quick --out /tmp/relay.md

Parts (each a function `part_<name>` returning a `Section`):

- `worker`   worker SSE vs the runtime driven in process (bench/worker_overhead.py), tiny model and SmolLM2;
- `llama`    rbee worker vs `python -m llama_cpp.server` on SmolLM2, 1/4/8 concurrent clients
             (bench/worker_overhead.py, mode llama-server);
- `relay`    queen relay vs the worker directly, single streams and 1/4/16 concurrent (bench/relay.py);
- `infer`    `rbee-keeper infer` cold (fresh node home: no hive, model not on the node) vs warm (worker
             known and up), by phase, on a real sshd node and on the local node, and the warm path
             against calling the worker directly;
- `status`   `rbee-keeper status` over 1/2/4/8 sshd nodes (127.0.0.2…127.0.0.9, each its own sshd and home);
- `sftp`     the SSH transport's SFTP `put` vs `scp` (and `scp -O`) of a 256 MiB file to the same sshd;
- `download` `rbee-hive models add http://127.0.0.1:P/…` vs `curl` of the same ~100 MB GGUF from the same
             local server (tests/hive/servers.py).

Every measurement is paired with its baseline and interleaved (the order flips or rotates every
repetition), so drift and other load on the shared machine hit both sides alike; the report gives
medians and the per-repetition figures behind them. Every loop is bounded in count, every
subprocess and request in time. Servers listen on 127.0.0.0/8 only. Everything started here
(sshd nodes, hives, workers, servers) is stopped on exit, errors and SIGTERM included; hives and
workers are found by their (unique, temporary) home path and killed by pid if `hive stop` left any.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import queue
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import relay  # noqa: E402  (bench/relay.py)
import worker_overhead as wo  # noqa: E402  (bench/worker_overhead.py)

from rbee_control.inventory.loader import load_inventory  # noqa: E402
from rbee_control.node.client import NodeClient  # noqa: E402
from rbee_control.ssh import remote as ssh_remote  # noqa: E402
from rbee_control.ssh.known_hosts import KnownHosts  # noqa: E402
from rbee_control.ssh.pool import TransportPool  # noqa: E402
from rbee_control.ssh.remote import SshTransport  # noqa: E402
from tests import sshd  # noqa: E402
from tests.hive.servers import FileServer, Served, serve_in_thread  # noqa: E402
from tests.keeper import conftest as keeper_fixtures  # noqa: E402

PARTS = ("worker", "llama", "relay", "infer", "status", "sftp", "download")
#: Ports for the workers of the hives started here (keeper tests use 8800–8899, other suites 8700–8799).
HIVE_ENV = {"RBEE_HIVE_PORT_MIN": "8930", "RBEE_HIVE_PORT_MAX": "8999"}
STATUS_ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 10))
STATUS_SIZES = (1, 2, 4, 8)
PROMPT = "Once upon a time, in a busy hive at the edge of a meadow, there lived a bee who"
NOISE = 0.03  # a ratio within 3 % of its target is shown as "≈" (within this machine's run-to-run noise)
RUN_TIMEOUT = 180.0


# ------------------------------------------------------------------------ report model


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


# ------------------------------------------------------------------- real sshd nodes


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


# ---------------------------------------------------------------- 1. worker overhead


def part_worker(ctx: Context) -> Section:
    section = Section("worker", "1. Worker SSE vs the runtime in process")
    plans = {"tiny": (ctx.reps(10, 4), 2000), "smollm2": (ctx.reps(6, 3), 64)}
    results: list[wo.OverheadResult] = []
    for label, (runs, tokens) in plans.items():
        args = wo.parse_args(["--model", label, "--runs", str(runs), "--tokens", str(tokens)])
        deadline = wo.Deadline(300)
        results.append(
            asyncio.run(wo.overhead_for(wo.resolve_model(label, ctx.tmp), args, ctx.tmp, deadline))
        )
    rates, ttfts = [], []
    for r in results:
        ratio, overhead = r.ratio, r.ttft_overhead_ms
        local_tps = med([s.tokens_per_s for s in r.local])
        sse_tps = med([s.tokens_per_s for s in r.remote])
        local_ttft = med([s.ttft_ms for s in r.local])
        sse_ttft = med([s.ttft_ms for s in r.remote])
        name = f"{r.model.label} ({r.model.backend}, {r.tokens} tokens, {len(r.local)} pairs)"
        section.rows.append(
            Row(
                f"{name}: tokens/s, SSE / in process",
                f"{sse_tps:.1f} vs {local_tps:.1f} tok/s",
                fmt(ratio),
                "≥ 0.97",
                at_least(ratio, 0.97),
            )
        )
        section.rows.append(
            Row(
                f"{name}: TTFT overhead",
                f"{sse_ttft:.1f} vs {local_ttft:.1f} ms",
                f"+{overhead:.1f} ms",
                "< 5 ms",
                below(overhead, 5.0),
            )
        )
        rates.append(
            [r.model.label, f"{local_tps:.1f}", f"{sse_tps:.1f}",
             f"{med([s.worker_tokens_per_s for s in r.remote]):.1f}", fmt(ratio),
             f"{r.cpu_us_per_token('in_process'):.0f}",
             f"{r.cpu_us_per_token('worker'):.0f} + {r.cpu_us_per_token('client'):.0f}",
             sum(a.text == b.text for a, b in zip(r.local, r.remote, strict=True))]
        )  # fmt: skip
        ttfts.append(
            [r.model.label, f"{local_ttft:.1f}", f"{sse_ttft:.1f}", f"{overhead:.1f}",
             f"{med([s.first_event_ms or math.nan for s in r.remote]):.1f}",
             f"{med([s.worker_ttft_ms or math.nan for s in r.remote]):.1f}", f"{r.http_rtt_ms:.1f}"]
        )  # fmt: skip
    section.body.append(
        "Same model, prompt, seed, sampling and thread count on both sides; the worker is a real "
        "`rbee-worker serve` subprocess read by an httpx streaming client in this process, runs paired "
        "and interleaved. *worker tok/s* is the rate the worker measured on its own side "
        "(`end.decode_ms`): when it is as low as the client's, the runtime itself ran slower inside the "
        "worker process, and delivery over HTTP added nothing. *CPU µs/token* is CPU time over the timed "
        "runs per generated token: in process (runtime and stopping logic; this process does nothing "
        "else meanwhile), and for SSE the worker process (all threads: runtime, event loop, HTTP) plus "
        "this process as the SSE client."
    )
    section.body.append(
        table(
            ["model", "in-process tok/s", "SSE tok/s", "worker tok/s", "ratio (median of pairs)",
             "CPU µs/token in process", "CPU µs/token worker + client", "same text (pairs)"],
            rates,
        )
    )  # fmt: skip
    section.body.append(
        "TTFT, split: *first event* is when the stream's `started` event reached the client (HTTP "
        "request, auth, validation, slot hand-off, response headers); *worker TTFT* is `end.ttft_ms`, "
        "the worker's own clock from accepting the request to the first token; *GET /v1/ready* is the "
        "median round trip of a small authenticated request on the same kept-alive connection — the "
        "floor of any request to the worker from this client."
    )
    section.body.append(
        table(
            ["model", "in-process TTFT ms", "SSE TTFT ms", "overhead ms (median of pairs)",
             "SSE first event ms", "worker TTFT ms", "GET /v1/ready ms"],
            ttfts,
        )
    )  # fmt: skip
    for r in results:
        section.body.append(
            f"Per pair, {r.model.label}: in-process tok/s {spread([s.tokens_per_s for s in r.local])}; "
            f"SSE tok/s {spread([s.tokens_per_s for s in r.remote])}; in-process TTFT ms "
            f"{spread([s.ttft_ms for s in r.local])}; SSE TTFT ms {spread([s.ttft_ms for s in r.remote])}."
        )
    plt = plt_module()
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 6.5), squeeze=False)
    for column, r in enumerate(results):
        pairs = range(1, len(r.local) + 1)
        ax = axes[0][column]
        ax.plot(pairs, [s.tokens_per_s for s in r.local], "o-", label="in process")
        ax.plot(pairs, [s.tokens_per_s for s in r.remote], "s-", label="worker SSE (client)")
        ax.plot(pairs, [s.worker_tokens_per_s for s in r.remote], "x--", label="worker SSE (worker side)")
        ax.set_title(f"{r.model.label}: decode tokens/s (ratio {fmt(r.ratio)}, target ≥ 0.97)")
        ax.set_xlabel("pair")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax = axes[1][column]
        ax.plot(pairs, [s.ttft_ms for s in r.local], "o-", label="in process")
        ax.plot(pairs, [s.ttft_ms for s in r.remote], "s-", label="worker SSE (client)")
        ax.plot(pairs, [s.worker_ttft_ms or math.nan for s in r.remote], "x--", label="worker side")
        ax.set_title(f"{r.model.label}: TTFT ms (overhead +{r.ttft_overhead_ms:.1f} ms, target < 5)")
        ax.set_xlabel("pair")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    save_figure(ctx, fig, "bench-worker.png", section)
    return section


# ------------------------------------------------------------- 2. vs llama_cpp.server


def part_llama(ctx: Context) -> Section:
    section = Section("llama", "2. rbee worker vs `llama_cpp.server` on SmolLM2")
    clients = (1, 4, 8)
    runs, tokens = ctx.reps(5, 2), 48
    args = wo.parse_args(
        ["--mode", "llama-server", "--model", "smollm2", "--runs", str(runs), "--tokens", str(tokens)]
    )
    args.max_seconds = 400
    results = asyncio.run(wo.llama_server_mode(args, ctx.tmp, clients))

    def non_decode_ms(batch: wo.Batch) -> float:
        """Wall time of a batch not spent decoding, per request: prompt, hand-offs, idle between requests."""
        return (batch.wall_s - sum(s.decode_s for s in batch.samples)) / len(batch.samples) * 1000

    detail: list[list[object]] = []
    spreads: list[str] = []
    for n in clients:
        rbee, other = results[("rbee", n)], results[("llama-server", n)]
        pairs = list(zip(rbee, other, strict=True))

        def ratio(
            metric: Callable[[wo.Batch], float], pairs: list[tuple[wo.Batch, wo.Batch]] = pairs
        ) -> float:
            return med([metric(a) / metric(b) for a, b in pairs])

        ttft_ratio = ratio(lambda b: b.ttft_ms)
        total_ratio = ratio(lambda b: b.total_tokens_per_s)
        req_ratio = ratio(lambda b: b.request_tokens_per_s)
        r_ttft, o_ttft = med([b.ttft_ms for b in rbee]), med([b.ttft_ms for b in other])
        r_total, o_total = (
            med([b.total_tokens_per_s for b in rbee]),
            med([b.total_tokens_per_s for b in other]),
        )
        r_req, o_req = (
            med([b.request_tokens_per_s for b in rbee]),
            med([b.request_tokens_per_s for b in other]),
        )
        section.rows.append(
            Row(
                f"{n} client(s): TTFT, rbee / llama_cpp.server",
                f"{r_ttft:.1f} vs {o_ttft:.1f} ms",
                fmt(ttft_ratio),
                "≤ 1.00 (not slower)",
                at_most(ttft_ratio, 1.0),
            )
        )
        section.rows.append(
            Row(
                f"{n} client(s): total tokens/s, rbee / llama_cpp.server",
                f"{r_total:.1f} vs {o_total:.1f} tok/s",
                fmt(total_ratio),
                "≥ 1.00 (not slower)",
                at_least(total_ratio, 1.0),
            )
        )
        detail.append(
            [n, f"{r_ttft:.1f}", f"{o_ttft:.1f}", fmt(ttft_ratio), f"{r_req:.1f}", f"{o_req:.1f}",
             fmt(req_ratio), f"{r_total:.1f}", f"{o_total:.1f}", fmt(total_ratio),
             f"{med([non_decode_ms(b) for b in rbee]):.0f} / {med([non_decode_ms(b) for b in other]):.0f}"]
        )  # fmt: skip
        spreads.append(
            f"{n} client(s), total tok/s per round: rbee {spread([b.total_tokens_per_s for b in rbee])}; "
            f"llama_cpp.server {spread([b.total_tokens_per_s for b in other])}."
        )
    section.body.append(
        f"SmolLM2 Q4_1, llama-cpp backend, {args.threads} thread(s), ctx {min(args.ctx, 8192)}, "
        f"{tokens} tokens per request, {len(results[('rbee', 1)])} rounds, both servers one request at a "
        "time (`--slots 1`; `--interrupt_requests False`), same prompt, seed and sampling (min_p 0, "
        "repeat_penalty 1, logits_all off). TTFT includes queueing behind the other clients; ratios are "
        "medians of per-round ratios."
    )
    section.body.append(
        table(
            ["clients", "rbee TTFT ms", "llama TTFT ms", "TTFT ratio", "rbee req tok/s", "llama req tok/s",
             "req ratio", "rbee total tok/s", "llama total tok/s", "total ratio",
             "non-decode ms per request, rbee / llama"],
            detail,
        )
    )  # fmt: skip
    section.body.append(
        "*non-decode ms per request* is a batch's wall time minus its requests' decode times (first to last "
        "token), per request: prompt evaluation, hand-offs and any idle time between queued requests. "
        + " ".join(spreads)
    )
    plt = plt_module()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.38
    xs = list(range(len(clients)))
    for ax, (title, metric) in zip(
        axes,
        [
            ("median TTFT ms (lower is better)", lambda b: b.ttft_ms),
            ("per-request decode tok/s", lambda b: b.request_tokens_per_s),
            ("total tok/s (higher is better)", lambda b: b.total_tokens_per_s),
        ],
        strict=True,
    ):
        for k, server in enumerate(("rbee", "llama-server")):
            values = [med([metric(b) for b in results[(server, n)]]) for n in clients]
            ax.bar([x + (k - 0.5) * width for x in xs], values, width, label=server)
        ax.set_xticks(xs, [f"{n} client(s)" for n in clients])
        ax.set_title(title)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper left")
    save_figure(ctx, fig, "bench-llama.png", section)
    return section


# -------------------------------------------------------------------------- 3. relay


def part_relay(ctx: Context) -> Section:
    section = Section("relay", "3. Queen relay vs the worker directly")
    plans = {
        "tiny": dict(runs=ctx.reps(20, 8), tokens=256, rounds=ctx.reps(3, 1)),
        "smollm2": dict(runs=ctx.reps(8, 4), tokens=24, rounds=ctx.reps(3, 1)),
    }
    streams = relay.CONCURRENCY
    results: dict[str, relay.RelayResult] = {}
    for label, plan in plans.items():
        args = argparse.Namespace(runs=plan["runs"], tokens=plan["tokens"], threads=1)
        model = relay.model_path(label, ctx.tmp)
        results[label] = asyncio.run(relay.run(args, model, ctx.tmp, streams, plan["rounds"]))
    detail = []
    for label, r in results.items():
        name = f"{label} ({r.tokens} tokens, {len(r.pairs)} pairs)"
        d_ttft = med([d.ttft_ms for d, _ in r.pairs])
        q_ttft = med([q.ttft_ms for _, q in r.pairs])
        d_tps = med([d.tokens_per_s for d, _ in r.pairs])
        q_tps = med([q.tokens_per_s for _, q in r.pairs])
        section.rows.append(
            Row(
                f"{name}: TTFT p50 overhead",
                f"{q_ttft:.1f} vs {d_ttft:.1f} ms",
                f"+{r.ttft_overhead_ms:.1f} ms",
                "≤ 3 ms",
                at_most(r.ttft_overhead_ms, 3.0),
            )
        )
        section.rows.append(
            Row(
                f"{name}: tokens/s, queen / direct",
                f"{q_tps:.0f} vs {d_tps:.0f} tok/s",
                fmt(r.tokens_per_s_ratio),
                "≥ 0.95",
                at_least(r.tokens_per_s_ratio, 0.95),
            )
        )
        for n in streams:
            sides = r.concurrency[n]
            agg = r.aggregate_ratio(n)
            section.rows.append(
                Row(
                    f"{label}: {n} concurrent streams, aggregate tokens/s, queen / direct",
                    f"{med(sides['queen']['agg']):.0f} vs {med(sides['direct']['agg']):.0f} tok/s",
                    fmt(agg),
                    "≥ 0.95",
                    at_least(agg, 0.95),
                )
            )
            detail.append(
                [label, n, fmt(relay.pct(sides["direct"]["ttft"], 50), 1),
                 fmt(relay.pct(sides["queen"]["ttft"], 50), 1),
                 fmt(relay.pct(sides["direct"]["ttft"], 95), 1),
                 fmt(relay.pct(sides["queen"]["ttft"], 95), 1), f"{med(sides['direct']['agg']):.0f}",
                 f"{med(sides['queen']['agg']):.0f}", fmt(agg)]
            )  # fmt: skip
    section.body.append(
        "One `rbee-worker serve` (`--slots 1`, 1 thread) registered with one `queen-rbee --no-inventory`; "
        "the "
        "same request goes straight to the worker (`POST /v1/inference`) or through the queen "
        "(`POST /v1/completions`, `stream: true`). Single streams are paired and interleaved; the concurrent "
        "rows send N streams at once (queueing included in TTFT) and alternate sides per round. The CPU "
        "table divides each process's CPU time over all timed requests by the tokens it handled: what "
        "relaying one token costs the queen, and what that is as a share of a core at the worker's rate."
    )
    section.body.append(
        table(
            ["model", "streams", "direct TTFT p50", "queen TTFT p50", "direct TTFT p95", "queen TTFT p95",
             "direct agg tok/s", "queen agg tok/s", "agg ratio"],
            detail,
        )
    )  # fmt: skip
    section.body.append(
        table(
            ["model", "tokens direct / queen", "worker CPU µs per token", "queen CPU µs per relayed token",
             "queen CPU at the direct aggregate rate"],
            [
                [label, f"{r.streamed.get('direct', 0)} / {r.streamed.get('queen', 0)}",
                 f"{r.cpu_us_per_token('worker'):.0f}", f"{r.cpu_us_per_token('queen'):.0f}",
                 f"{r.cpu_us_per_token('queen') * med(r.concurrency[streams[0]]['direct']['agg']) / 1e6:.2f} "
                 "cores"]
                for label, r in results.items()
            ],
        )
    )  # fmt: skip
    for label, r in results.items():
        section.body.append(
            f"Per pair, {label}: queen − direct TTFT ms "
            f"{spread([q.ttft_ms - d.ttft_ms for d, q in r.pairs])}; queen/direct tok/s "
            f"{spread([q.tokens_per_s / d.tokens_per_s for d, q in r.pairs], 2)}."
        )
    plt = plt_module()
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 6.5), squeeze=False)
    for column, (label, r) in enumerate(results.items()):
        ax = axes[0][column]
        pairs = range(1, len(r.pairs) + 1)
        ax.plot(pairs, [d.ttft_ms for d, _ in r.pairs], "o-", label="direct")
        ax.plot(pairs, [q.ttft_ms for _, q in r.pairs], "s-", label="through the queen")
        ax.set_title(f"{label}: single-stream TTFT ms (p50 +{r.ttft_overhead_ms:.1f} ms, target ≤ 3)")
        ax.set_xlabel("pair")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax = axes[1][column]
        xs = list(range(len(streams)))
        for k, side in enumerate(("direct", "queen")):
            values = [med(r.concurrency[n][side]["agg"]) for n in streams]
            ax.bar([x + (k - 0.5) * 0.38 for x in xs], values, 0.38, label=side)
        ax.set_xticks(xs, [f"{n} streams" for n in streams])
        ax.set_title(f"{label}: aggregate tokens/s (target queen ≥ 0.95 × direct)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
        ax.legend(fontsize=8, loc="upper left", ncols=2)
    save_figure(ctx, fig, "bench-relay.png", section)
    return section


# -------------------------------------------------------------------------- 4. infer


INFER_TOKENS = 20
INFER_SEED = 5
PHASE_ORDER = ("reuse", "connect", "hive", "provision", "spawn", "stream")


def keeper_infer(fleet: KeeperFleet, node: str, model: str, *extra: str) -> tuple[float, dict[str, Any]]:
    run = fleet.keeper.run(
        "infer", "--node", node, "--model", model, *extra, "--prompt", PROMPT, "--max-tokens",
        str(INFER_TOKENS), "--seed", str(INFER_SEED), "--raw", json_mode=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    if run.rc != 0:
        raise RuntimeError(f"keeper infer failed:\n{run}")
    return run.seconds, run.json()


def direct_body() -> dict[str, Any]:
    """What `rbee-keeper infer --raw` sends for the options above."""
    return {
        "prompt": PROMPT, "max_tokens": INFER_TOKENS, "temperature": 0.7, "top_p": 0.95, "top_k": 40,
        "seed": INFER_SEED,
    }  # fmt: skip


def direct_in_process(url: str, api_key: str) -> float:
    """A fresh httpx client streaming the whole answer, as the keeper's stream phase does."""
    started = time.perf_counter()
    with (
        httpx.Client(timeout=60, trust_env=False) as client,
        client.stream(
            "POST", f"{url}/v1/inference", json=direct_body(), headers={"Authorization": f"Bearer {api_key}"}
        ) as response,
    ):
        response.raise_for_status()
        for _ in response.iter_lines():
            pass
    return time.perf_counter() - started


DIRECT_SCRIPT = (
    "import httpx, json, sys\n"
    "with httpx.stream('POST', sys.argv[1] + '/v1/inference', json=json.loads(sys.argv[2]),"
    " headers={'Authorization': 'Bearer ' + sys.argv[3]}, timeout=60, trust_env=False) as r:\n"
    "    r.raise_for_status()\n"
    "    [sys.stdout.write(line) for line in r.iter_lines()]\n"
)


def direct_process(url: str, api_key: str) -> float:
    """A fresh Python that imports httpx and streams the answer: the floor for any CLI client."""
    return command_seconds([sys.executable, "-c", DIRECT_SCRIPT, url, json.dumps(direct_body()), api_key])


def command_seconds(argv: list[str]) -> float:
    """Wall time of one command that must succeed, output discarded."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - started


def part_infer(ctx: Context) -> Section:
    section = Section("infer", "4. `rbee-keeper infer`: cold vs warm, by phase")
    model = smollm2()
    node = ctx.sshd.get("127.0.0.2")
    nodes = ("n2", "local")
    cold_reps, warm_reps = ctx.reps(3, 1), ctx.reps(5, 2)
    cold: dict[str, list[tuple[float, dict[str, Any]]]] = {n: [] for n in nodes}
    warm: dict[str, list[tuple[float, dict[str, Any]]]] = {n: [] for n in nodes}
    direct: dict[str, dict[str, list[float]]] = {n: {"in_process": [], "process": []} for n in nodes}
    fleet: KeeperFleet | None = None
    try:
        for rep in range(cold_reps):
            if fleet is not None:
                stop_hives(fleet)
            fleet = make_fleet(ctx.tmp / f"infer-{rep}", {"n2": node}, local=True)
            for name in nodes if rep % 2 == 0 else tuple(reversed(nodes)):
                log(f"infer: cold {name} ({rep + 1}/{cold_reps})")
                cold[name].append(keeper_infer(fleet, name, f"file:{model}", "--name", "smollm2"))
        assert fleet is not None
        workers = {w["node"]: w for w in fleet.keeper.known_workers()}
        for rep in range(warm_reps):
            for name in nodes if rep % 2 == 0 else tuple(reversed(nodes)):
                w = workers[name]
                steps: list[tuple[str, Callable[[], Any]]] = [
                    ("keeper", lambda name=name: warm[name].append(keeper_infer(fleet, name, "smollm2"))),
                    ("in_process", lambda w=w, name=name: direct[name]["in_process"].append(
                        direct_in_process(w["url"], w["api_key"]))),
                    ("process", lambda w=w, name=name: direct[name]["process"].append(
                        direct_process(w["url"], w["api_key"]))),
                ]  # fmt: skip
                shift = rep % len(steps)
                for _, step in steps[shift:] + steps[:shift]:
                    step()
    finally:
        if fleet is not None:
            stop_hives(fleet)

    def phases_median(runs: list[tuple[float, dict[str, Any]]]) -> dict[str, float]:
        names = [p for p in PHASE_ORDER if any(p in s["phases_s"] for _, s in runs)]
        return {p: med([s["phases_s"].get(p, 0.0) for _, s in runs]) for p in names}

    detail = []
    cold_streams: dict[str, list[float]] = {}
    for name in nodes:
        kind = "sshd node 127.0.0.2" if name == "n2" else "local node"
        cold_wall = med([w for w, _ in cold[name]])
        warm_wall = med([w for w, _ in warm[name]])
        cold_ph, warm_ph = phases_median(cold[name]), phases_median(warm[name])
        warm_paths = {tuple(sorted(s["phases_s"])) for _, s in warm[name]}
        http_only = warm_paths == {("reuse", "stream")}
        keeper_phases = [sum(s["phases_s"].values()) for _, s in warm[name]]
        in_proc, proc = direct[name]["in_process"], direct[name]["process"]
        overhead_phases = med([k - d for k, d in zip(keeper_phases, in_proc, strict=True)]) * 1000
        overhead_wall = med([w - d for (w, _), d in zip(warm[name], proc, strict=True)]) * 1000
        section.rows.append(
            Row(
                f"{name} ({kind}): cold infer, wall",
                f"{cold_wall:.2f} s (" + ", ".join(f"{p} {v:.2f}" for p, v in cold_ph.items()) + ")",
                f"{cold_wall / warm_wall:.1f}× warm",
                "— (none set)",
            )
        )
        section.rows.append(
            Row(
                f"{name}: warm infer, wall (phases {'reuse+stream: HTTP only' if http_only else warm_paths})",
                f"{warm_wall:.2f} s",
                f"{med([w / d for (w, _), d in zip(warm[name], proc, strict=True)]):.2f}× bare httpx process",
                "< 5 s (spec: warm start) and no SSH",
                "✅" if warm_wall < 5 and http_only else "❌",
            )
        )
        section.rows.append(
            Row(
                f"{name}: warm overhead vs calling the worker directly",
                f"keeper phases +{overhead_phases:.0f} ms vs in-process httpx; "
                f"keeper wall +{overhead_wall:.0f} ms vs a fresh `python -c httpx`",
                f"{med([k / d for k, d in zip(keeper_phases, in_proc, strict=True)]):.2f}× (phases)",
                "phases < direct + 500 ms (tests/keeper)",
                below(overhead_phases, 500.0),
            )
        )
        detail.append(
            [name, "cold", f"{cold_wall:.2f}", *(fmt(cold_ph.get(p, math.nan)) for p in PHASE_ORDER),
             spread([s["ttft_ms"] for _, s in cold[name]], 0),
             spread([s["tokens_per_second"] for _, s in cold[name]], 0),
             spread([w for w, _ in cold[name]], 2)]
        )  # fmt: skip
        detail.append(
            [name, "warm", f"{warm_wall:.2f}", *(fmt(warm_ph.get(p, math.nan), 3) for p in PHASE_ORDER),
             spread([s["ttft_ms"] for _, s in warm[name]], 0),
             spread([s["tokens_per_second"] for _, s in warm[name]], 0),
             spread([w for w, _ in warm[name]], 2)]
        )  # fmt: skip
        detail.append(
            [name, "direct, in-process httpx", f"{med(in_proc):.3f}", *("" for _ in PHASE_ORDER), "", "",
             spread(in_proc, 3)]
        )  # fmt: skip
        detail.append(
            [name, "direct, fresh `python -c`", f"{med(proc):.2f}", *("" for _ in PHASE_ORDER), "", "",
             spread(proc, 2)]
        )  # fmt: skip
        cold_streams[name] = [s["phases_s"].get("stream", math.nan) for _, s in cold[name]]
    section.body.append(
        f"SmolLM2 via `file:` ref, {INFER_TOKENS} tokens, `--raw` (so the keeper and the direct calls send "
        "the same prompt), `--json`. *Cold*: a fresh inventory, node home and keeper config per repetition "
        "— no hive running, the model not on the node (pushed over SFTP to the sshd node, imported on the "
        "local one), no known worker. *Warm*: the worker of the last cold run is known and up. Wall = the "
        "whole `rbee-keeper` "
        "process as the operator waits for it (Python start-up and imports included); phases are the "
        "keeper's own `phases_s` (medians, seconds). The direct rows stream the same request from the worker "
        f"with a new httpx client in this process, and from a fresh `python -c` importing httpx. "
        f"{len(cold['n2'])} cold and {len(warm['n2'])} warm repetitions per node, interleaved."
    )
    section.body.append(
        table(
            ["node", "path", "wall s", *PHASE_ORDER, "TTFT ms per repetition", "tok/s per repetition",
             "wall per repetition"],
            detail,
        )
    )  # fmt: skip
    section.body.append(
        "*TTFT* and *tok/s* are the keeper's own figures for the streamed answer (its `--json` summary); on "
        "a cold run that is the new worker's first request. Cold `stream` phase per repetition: "
        + "; ".join(f"{name} {spread(values, 2)} s" for name, values in cold_streams.items())
        + "."
    )
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(12, 5))
    labels, left = [], []
    bars: list[tuple[str, dict[str, float]]] = []
    outside = "keeper start-up + exit (outside phases)"

    def with_outside(runs: list[tuple[float, dict[str, Any]]]) -> dict[str, float]:
        return {
            **phases_median(runs),
            outside: med([wall - sum(summary["phases_s"].values()) for wall, summary in runs]),
        }

    for name in nodes:
        bars.append((f"{name} cold", with_outside(cold[name])))
        bars.append((f"{name} warm", with_outside(warm[name])))
        bars.append((f"{name} direct, in process", {"direct httpx": med(direct[name]["in_process"])}))
        bars.append((f"{name} direct, python -c", {"python -c httpx (wall)": med(direct[name]["process"])}))
    colors = dict(
        zip(
            [*PHASE_ORDER, "direct httpx", "python -c httpx (wall)", outside],
            plt.cm.tab10.colors,
            strict=False,
        )
    )
    seen: set[str] = set()
    for y, (label, phases) in enumerate(bars):
        labels.append(label)
        x = 0.0
        for phase, value in phases.items():
            ax.barh(y, value, left=x, color=colors[phase], label=None if phase in seen else phase)
            seen.add(phase)
            x += value
        left.append(x)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (medians)")
    ax.set_title("rbee-keeper infer on SmolLM2: phases")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(ctx, fig, "bench-infer.png", section)
    return section


# ------------------------------------------------------------------------- 5. status


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


# --------------------------------------------------------------------------- 6. sftp


async def sftp_put(node: Any, known_hosts: Path, source: Path, target: str) -> dict[str, float | str]:
    cpu0, t0 = self_cpu(), time.perf_counter()
    transport = SshTransport(node, known_hosts=KnownHosts(known_hosts))
    try:
        await transport.connect()
        t1 = time.perf_counter()
        await transport.put(source, target, resume=False)
        t2 = time.perf_counter()
        conn = await transport.connection()
        cipher = str(conn.get_extra_info("send_cipher"))
    finally:
        await transport.close()
    return {"wall": time.perf_counter() - t0, "put": t2 - t1, "cpu": self_cpu() - cpu0, "cipher": cipher}


GCM = "aes128-gcm@openssh.com"


async def put_with_cipher(
    node: sshd.SshdNode, source: Path, target: str, cipher: str
) -> dict[str, float | str]:
    """Diagnostic: the transport's own upload loop over an asyncssh connection with another cipher."""
    cpu0, t0 = self_cpu(), time.perf_counter()
    async with asyncssh.connect(
        node.host, node.port, username=node.user, client_keys=[str(node.client_key)],
        known_hosts=([node.host_key], [], []), config=None, encryption_algs=[cipher],
    ) as conn:  # fmt: skip
        async with conn.start_sftp_client() as sftp:
            await ssh_remote._upload(sftp, source, target, source.stat().st_size, 0, None)
        got = str(conn.get_extra_info("send_cipher"))
    return {"wall": time.perf_counter() - t0, "cpu": self_cpu() - cpu0, "cipher": got}


def scp_argv(node: sshd.SshdNode, known_hosts: Path, source: Path, target: str, *extra: str) -> list[str]:
    return [
        "scp", "-q", *extra, "-i", str(node.client_key), "-P", str(node.port),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
        str(source), f"{node.user}@{node.host}:{target}",
    ]  # fmt: skip


def part_sftp(ctx: Context) -> Section:
    section = Section("sftp", "6. SFTP push vs `scp` (256 MiB over loopback, same sshd)")
    node = ctx.sshd.get("127.0.0.2")
    base = ctx.tmp / "sftp"
    fleet = make_fleet(base, {"n2": node}, local=False)
    known_hosts = fleet.keeper.config_dir / "known_hosts"
    inventory_node = load_inventory(fleet.inventory).node("n2")
    size = 256 * 1024 * 1024
    source = base / "payload.bin"
    with source.open("wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))  # incompressible
    dest = base / "dest"
    dest.mkdir()
    probe = subprocess.run(
        [*scp_argv(node, known_hosts, REPO / "README.md", str(dest / "probe"), "-v")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    scp_cipher = next(
        (
            line.split("cipher:")[1].split()[0]
            for line in probe.stderr.splitlines()
            if "client->server cipher" in line
        ),
        "?",
    )
    reps = ctx.reps(5, 2)
    sides = ("sftp put", "scp", "scp -O", f"put, {GCM.split('@')[0]}")
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    server_cpu: dict[str, list[float]] = {s: [] for s in sides}
    put_only: list[float] = []
    cipher = "?"
    for rep in range(reps):
        order = list(sides[rep % len(sides) :] + sides[: rep % len(sides)])
        for side in order:
            target = dest / f"{side.replace(' ', '_')}.bin"
            server0 = sshd_cpu([node])
            if side == "sftp put":
                got = asyncio.run(
                    asyncio.wait_for(sftp_put(inventory_node, known_hosts, source, str(target)), 300)
                )
                wall[side].append(float(got["wall"]))
                cpu[side].append(float(got["cpu"]))
                put_only.append(float(got["put"]))
                cipher = str(got["cipher"])
            elif side.startswith("put, "):
                got = asyncio.run(asyncio.wait_for(put_with_cipher(node, source, str(target), GCM), 300))
                if got["cipher"] != GCM:
                    raise RuntimeError(f"asked for {GCM}, got {got['cipher']}")
                wall[side].append(float(got["wall"]))
                cpu[side].append(float(got["cpu"]))
            else:
                extra = ("-O",) if side == "scp -O" else ()
                cpu0, t0 = children_cpu(), time.perf_counter()
                subprocess.run(
                    scp_argv(node, known_hosts, source, str(target), *extra),
                    check=True, capture_output=True, timeout=300,
                )  # fmt: skip
                wall[side].append(time.perf_counter() - t0)
                cpu[side].append(children_cpu() - cpu0)
            if target.stat().st_size != size:
                raise RuntimeError(f"{side}: {target.stat().st_size} bytes arrived, not {size}")
            target.unlink()
            time.sleep(0.3)  # let the connection's sshd processes exit and be reaped
            server_cpu[side].append(sshd_cpu([node]) - server0)
        log(f"sftp: repetition {rep + 1}/{reps} done")
    source.unlink()
    mb = size / 1e6
    rate = {s: med([mb / w for w in wall[s]]) for s in sides}
    ratio = med([s / p for s, p in zip(wall["scp"], wall["sftp put"], strict=True)])  # = put MB/s / scp MB/s
    section.rows.append(
        Row(
            "SFTP `put` (connect included) vs `scp`",
            f"{rate['sftp put']:.0f} vs {rate['scp']:.0f} MB/s",
            f"{ratio:.2f}×",
            "≥ 0.8× scp",
            at_least(ratio, 0.8),
        )
    )
    ratio_o = med([a / b for a, b in zip(wall["scp -O"], wall["sftp put"], strict=True)])
    section.rows.append(
        Row(
            "SFTP `put` vs `scp -O` (legacy SCP protocol)",
            f"{rate['sftp put']:.0f} vs {rate['scp -O']:.0f} MB/s",
            f"{ratio_o:.2f}×",
            "— (reference)",
        )
    )
    gcm = sides[3]
    ratio_gcm = med([s / p for s, p in zip(wall["scp"], wall[gcm], strict=True)])
    section.rows.append(
        Row(
            f"diagnostic: the same upload loop with `{GCM}` instead of chacha20-poly1305, vs `scp`",
            f"{rate[gcm]:.0f} vs {rate['scp']:.0f} MB/s",
            f"{ratio_gcm:.2f}×",
            "— (diagnostic)",
        )
    )
    section.body.append(
        f"A {size >> 20} MiB file of random bytes, pushed {reps} times per side (order rotated) to the "
        "same sshd on 127.0.0.2, read from and written to the same local disk. *sftp put* is "
        "`SshTransport.put` (what `models add file:` and a cold `infer` use; 255 KiB writes, 16 in "
        f"flight), its connect included; `scp` is {ssh_version()}'s scp, which speaks SFTP by default; "
        "`scp -O` uses the old SCP protocol. *client CPU* is this process's CPU time during the put "
        "(asyncssh runs in it) or the scp client's; *server CPU* is the sshd side (its connection "
        "process and `sftp-server`). *put, aes128-gcm* is a diagnostic, not what rbee does: the "
        "transport's own upload loop (`rbee_control.ssh.remote._upload`) over an asyncssh connection "
        f"that negotiates `{GCM}`. Default ciphers: asyncssh "
        f"`{cipher}`, OpenSSH `{scp_cipher}`."
    )
    rows = [
        [s, f"{rate[s]:.0f}", f"{med(wall[s]):.2f}", f"{med(cpu[s]):.2f}", f"{med(server_cpu[s]):.2f}",
         spread(wall[s], 2)]
        for s in sides
    ]  # fmt: skip
    put_rate = med([mb / p for p in put_only])
    rows.append(
        ["sftp put, transfer only", f"{put_rate:.0f}", f"{med(put_only):.2f}", "", "", spread(put_only, 2)]
    )
    section.body.append(
        table(
            ["side", "MB/s", "wall s", "client CPU s", "server CPU s", "wall per repetition"],
            rows,
        )
    )
    ctx_rates = {**rate, "sftp put (transfer only)": med([mb / p for p in put_only])}
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    labels = list(ctx_rates)
    ax.barh(labels, [ctx_rates[k] for k in labels], color=["C0", "C1", "C2", "C3", "C0"])
    ax.axvline(0.8 * rate["scp"], color="red", linestyle=":", label="target: 0.8 × scp")
    ax.set_xlabel("MB/s (higher is better)")
    ax.set_title(f"push of {size >> 20} MiB to an sshd on loopback")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    save_figure(ctx, fig, "bench-sftp.png", section)
    return section


def ssh_version() -> str:
    got = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    return (got.stderr or got.stdout).split(",")[0].strip()


# ----------------------------------------------------------------------- 7. download


@dataclasses.dataclass
class KnownDigest(Served):
    """A served file whose sha256 (the ETag) is computed once, not on every request."""

    digest: str = ""

    @property
    def sha256(self) -> str:
        return self.digest


def hive_download(url: str, home: Path) -> dict[str, float]:
    """`rbee-hive models add URL` into a fresh home; wall time and the download phase from its events."""
    argv = [str(Path(sys.prefix) / "bin" / "rbee-hive"), "--home", str(home), "--json", "models", "add", url,
            "--name", "smol"]  # fmt: skip
    started = time.perf_counter()
    phases: dict[str, list[float]] = {}
    result: dict[str, Any] | None = None
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded: the process is killed at the timeout below
            now = time.perf_counter() - started
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                data = event.get("data", event)
                if event.get("event") == "progress":
                    phases.setdefault(str(data.get("phase")), []).append(now)
                elif event.get("event") in ("result", "error"):
                    result = event
            if now > RUN_TIMEOUT:
                break
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or result is None or result.get("event") != "result":
        raise RuntimeError(f"rbee-hive models add failed ({proc.returncode}): {result}")
    download = phases.get("download", [])
    return {
        "wall": wall,
        "download": (max(download) - min(download)) if len(download) > 1 else math.nan,
        "first_byte": min(download) if download else math.nan,
        "verify": (max(phases["verify"]) - min(phases["verify"]))
        if len(phases.get("verify", [])) > 1
        else 0.0,
    }


def hive_fixed_cost(home: Path) -> float:
    """Wall time of a hive command that moves no bytes (`models list` on an empty home)."""
    return command_seconds(
        [str(Path(sys.prefix) / "bin" / "rbee-hive"), "--home", str(home), "--json", "models", "list"]
    )


def part_download(ctx: Context) -> Section:
    section = Section("download", "7. Hive download vs `curl` (same file, same local server)")
    model = smollm2()
    size = model.stat().st_size
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    base = ctx.tmp / "download"
    base.mkdir()
    server = FileServer()
    reps = ctx.reps(5, 2)
    hive: list[dict[str, float]] = []
    curl: list[dict[str, float]] = []
    fixed: list[float] = []
    with serve_in_thread(server.app()) as url:
        server.url = url
        server.files["smol.gguf"] = KnownDigest(model, digest=digest)
        file_url = f"{url}/files/smol.gguf"
        httpx.get(file_url, timeout=60, trust_env=False).raise_for_status()  # warm the page cache and server
        for rep in range(reps):
            order = ("hive", "curl", "fixed") if rep % 2 == 0 else ("fixed", "curl", "hive")
            for side in order:
                home = base / f"home-{rep}-{side}"
                if side == "hive":
                    hive.append(hive_download(file_url, home))
                elif side == "fixed":
                    fixed.append(hive_fixed_cost(home))
                else:
                    out = base / "curl.gguf"
                    t0 = time.perf_counter()
                    got = subprocess.run(
                        ["curl", "-sS", "--fail", "--noproxy", "*", "-o", str(out), "-w",
                         "%{time_starttransfer} %{time_total}", file_url],
                        check=True, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                    )  # fmt: skip
                    wall = time.perf_counter() - t0
                    first, total = (float(v) for v in got.stdout.split())
                    if out.stat().st_size != size:
                        raise RuntimeError("curl got a short file")
                    out.unlink()
                    curl.append({"wall": wall, "download": total - first, "first_byte": first})
                shutil.rmtree(home, ignore_errors=True)
            log(f"download: repetition {rep + 1}/{reps} done")
    mb = size / 1e6
    hive_wall, curl_wall = med([h["wall"] for h in hive]), med([c["wall"] for c in curl])
    hive_dl = med([h["download"] for h in hive])
    ratio_wall = med([c["wall"] / h["wall"] for h, c in zip(hive, curl, strict=True)])
    ratio_dl = med([c["wall"] / h["download"] for h, c in zip(hive, curl, strict=True)])
    section.rows.append(
        Row(
            "`rbee-hive models add http:` (whole command) vs `curl -o`",
            f"{mb / hive_wall:.0f} vs {mb / curl_wall:.0f} MB/s ({hive_wall:.2f} vs {curl_wall:.2f} s)",
            f"{ratio_wall:.2f}×",
            "— (none set; judged against 0.8× as for SFTP vs scp)",
            at_least(ratio_wall, 0.8),
        )
    )
    section.rows.append(
        Row(
            "hive download phase alone (first to last `download` event) vs `curl -o`",
            f"{mb / hive_dl:.0f} vs {mb / curl_wall:.0f} MB/s",
            f"{ratio_dl:.2f}×",
            "— (none set; judged against 0.8× as for SFTP vs scp)",
            at_least(ratio_dl, 0.8),
        )
    )
    section.body.append(
        f"The SmolLM2 GGUF ({mb:.0f} MB; a real model file, as the hive validates the GGUF header) "
        "served by tests/hive/servers.py's Starlette file server (uvicorn, 1 MiB chunks, in a thread of "
        f"this process, its sha256 ETag computed once) on 127.0.0.1; {reps} repetitions per side, "
        "alternating. The hive command writes `<home>/models/smol.gguf.part`, hashing (sha256) each chunk "
        "as it writes it, checks the GGUF header, renames the file and writes the catalog row; curl only "
        "writes the file. *to first "
        "byte* is until the hive's first `download` progress event (curl: `time_starttransfer`); "
        "*download* the span of the `download` events (throttled, so approximate); *after* the rest "
        "(GGUF check, rename, catalog, exit). *fixed cost* is `rbee-hive models list` on an empty home: "
        "what any hive command costs before it moves a byte."
    )
    hive_first = med([h["first_byte"] for h in hive])
    hive_after = med([h["wall"] - h["first_byte"] - h["download"] for h in hive])
    section.body.append(
        table(
            ["side", "wall s", "MB/s (wall)", "to first byte s", "download s", "after s",
             "wall per repetition"],
            [
                ["rbee-hive models add", f"{hive_wall:.2f}", f"{mb / hive_wall:.0f}", f"{hive_first:.2f}",
                 f"{hive_dl:.2f}", f"{hive_after:.2f}", spread([h["wall"] for h in hive], 2)],
                ["curl -o", f"{curl_wall:.2f}", f"{mb / curl_wall:.0f}",
                 f"{med([c['first_byte'] for c in curl]):.2f}", f"{med([c['download'] for c in curl]):.2f}",
                 "", spread([c["wall"] for c in curl], 2)],
                ["fixed cost: rbee-hive models list", f"{med(fixed):.2f}", "", "", "", "", spread(fixed, 2)],
            ],
        )
    )  # fmt: skip
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    bars = {
        "rbee-hive models add": {"to first byte": hive_first, "download": hive_dl, "after": hive_after},
        "curl -o": {
            "to first byte": med([c["first_byte"] for c in curl]),
            "download": med([c["download"] for c in curl]),
            "after": 0.0,
        },
        "rbee-hive models list": {"to first byte": med(fixed), "download": 0.0, "after": 0.0},
    }
    for y, phases in enumerate(bars.values()):
        x = 0.0
        for k, (phase, value) in enumerate(phases.items()):
            ax.barh(y, value, left=x, color=f"C{k}", label=phase if y == 0 else None)
            x += value
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median)")
    ax.set_title(f"download of a {mb:.0f} MB GGUF from a local HTTP server")
    ax.legend(fontsize=8)
    save_figure(ctx, fig, "bench-download.png", section)
    return section


# -------------------------------------------------------------------------- the report


RUNNERS: dict[str, Callable[[Context], Section]] = {
    "worker": part_worker,
    "llama": part_llama,
    "relay": part_relay,
    "infer": part_infer,
    "status": part_status,
    "sftp": part_sftp,
    "download": part_download,
}
TITLES = {
    "worker": "1. Worker SSE vs the runtime in process",
    "llama": "2. rbee worker vs `llama_cpp.server` on SmolLM2",
    "relay": "3. Queen relay vs the worker directly",
    "infer": "4. `rbee-keeper infer`: cold vs warm, by phase",
    "status": "5. `rbee-keeper status` fan-out over 1/2/4/8 sshd nodes",
    "sftp": "6. SFTP push vs `scp`",
    "download": "7. Hive download vs `curl`",
}


def handoff_probe(count: int = 300) -> str:
    """Round trips of a value between two threads of this process: how long a thread waits to run
    right now (scheduler and GIL), which every cross-thread hand-off in a worker or queen pays."""
    to_echo: queue.SimpleQueue[int] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        for _ in range(count):
            back.put(to_echo.get(timeout=5))

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    times = []
    for i in range(count):
        started = time.perf_counter()
        to_echo.put(i)
        back.get(timeout=5)
        times.append((time.perf_counter() - started) * 1e6)
    thread.join(5)
    times.sort()
    return (
        f"thread hand-off round trip median {times[len(times) // 2]:.0f} µs, "
        f"p90 {times[len(times) * 9 // 10]:.0f} µs, max {times[-1]:.0f} µs"
    )


def machine_line() -> str:
    load = os.getloadavg()
    try:
        import llama_cpp

        llama = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        llama = "no llama-cpp-python"
    return (
        f"{platform.node() or 'this machine'}: {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {llama}, {ssh_version()}; load average at start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), {handoff_probe()}"
    )


HOW_TO_READ = """\
## How to read this

- Every figure comes from **one run of `bench/report.py` on this machine**, both sides of each comparison
  measured side by side, paired and interleaved (the order flips or rotates every repetition), so load from
  other work on the machine hits both sides alike. The machine has 2 cores shared with other jobs
  (see the load average above): expect a few percent of noise between runs, more on the concurrent rows.
- **measured** gives the two medians compared (rbee side first); **ratio** is the median of the per-pair
  ratios (or differences, for TTFT overheads) — not the ratio of the two medians, so it can differ slightly.
- **met?**: ✅ target met; ≈ missed by less than 3 % (inside this machine's run-to-run noise: rerun before
  acting); ❌ missed; — no target set. Targets come from the project's issues and DESIGN.md; where none
  was set the column says so.
- Each section lists the per-repetition figures behind its medians; read them for spread before trusting
  a small difference. The plots show every repetition where that helps.
- The machine line gives the load average and a *thread hand-off* probe (a value passed between two threads
  of the report process and back, 300 times) at the start and at the end: every worker and queen request
  crosses threads and processes, so a machine busy with other work slows the rbee side of most rows more
  than its in-process baseline. Compare runs only at similar load.
- A part can be run alone while working on it: `python bench/report.py --only status` (markdown on stdout).
"""


def render(
    sections: list[Section],
    command: str,
    started_at: dt.datetime,
    seconds: float,
    machine: str,
    end_load: str,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` (from the repository root, in a venv with rbee and its `llama` "
        "extra, `matplotlib`, and for part 2 `fastapi sse-starlette starlette-context pydantic-settings`) "
        f"on {started_at:%Y-%m-%d %H:%M} UTC, in {seconds / 60:.1f} min.",
        "",
        f"Machine: {machine}; at the end {end_load}.",
        "",
        HOW_TO_READ,
        "## Summary",
        "",
        "| part | what | measured | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    for section in sections:
        part = section.title.split(" ", 1)[0].rstrip(".")
        if section.error:
            lines.append(
                f"| {part} | {section.title} | **failed**: {section.error.splitlines()[-1]} | | | ❌ |"
            )
        for row in section.rows:
            lines.append(
                f"| {part} | {row.what} | {row.measured} | {row.ratio} | {row.target} | {row.verdict} |"
            )
    for section in sections:
        lines += ["", f"## {section.title}", "", f"*{section.seconds:.0f} s of the run.*", ""]
        if section.error:
            lines += ["This part failed:", "", "```", section.error.strip()[-3000:], "```", ""]
        for paragraph in section.body:
            lines += [paragraph, ""]
        if section.image:
            lines += [f"![{section.title}]({section.image})", ""]
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", help=f"comma-separated parts to run (default: all): {', '.join(PARTS)}", default=""
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions (for iterating, not for the docs)"
    )
    parser.add_argument(
        "--out",
        help="markdown file to write (default: docs/benchmarks.md for a full run, stdout with --only); "
        "plots go to img/ beside it",
    )
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()] or list(PARTS)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.out is None and not args.only:
        args.out = str(REPO / "docs" / "benchmarks.md")
    return args


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop what was started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    shown = sys.executable if os.path.isabs(sys.executable) else "python"
    command = shlex.join([shown, "bench/report.py", *(argv if argv is not None else sys.argv[1:])])
    started_at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    machine = machine_line()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="rbee-report-") as tmp_name:
        tmp = Path(tmp_name)
        if args.out and args.out != "-":
            out: Path | None = Path(args.out)
            img_dir, img_prefix = out.parent / "img", "img"
        else:  # markdown on stdout: plots in a directory of their own that outlives this run
            out = None
            img_dir = Path(tempfile.mkdtemp(prefix="rbee-report-img-"))
            img_prefix = str(img_dir)
        img_dir.mkdir(parents=True, exist_ok=True)
        pool = SshdPool(tmp / "sshd")
        ctx = Context(tmp, img_dir, img_prefix, args.quick, pool)
        try:
            for part in args.parts:
                log(f"part {part}: start")
                t0 = time.monotonic()
                try:
                    section = RUNNERS[part](ctx)
                except Exception:  # one failing part must not hide the others
                    section = Section(part, TITLES[part], error=traceback.format_exc())
                    log(f"part {part}: FAILED\n{section.error}")
                section.seconds = time.monotonic() - t0
                sections.append(section)
                log(f"part {part}: {section.seconds:.0f} s")
        finally:
            pool.close()
        load = os.getloadavg()
        end_load = f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, {handoff_probe()}"
        text = render(sections, command, started_at, time.monotonic() - started, machine, end_load)
        if out is None:
            print(text)
            log(f"plots in {img_dir}")
        else:
            out.write_text(text)
            log(f"wrote {out} and {len(list(img_dir.glob('bench-*.png')))} plots in {img_dir}")
    log(f"took {time.monotonic() - started:.0f} s")
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
