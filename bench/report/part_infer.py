"""Part 4: `rbee-keeper infer` cold against warm, by phase, on an sshd node and the local node."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from .common import (
    RUN_TIMEOUT,
    Context,
    KeeperFleet,
    Row,
    Section,
    below,
    command_seconds,
    fmt,
    log,
    make_fleet,
    med,
    plt_module,
    save_figure,
    smollm2,
    spread,
    stop_hives,
    table,
)

PROMPT = "Once upon a time, in a busy hive at the edge of a meadow, there lived a bee who"
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
