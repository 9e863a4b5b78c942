"""Part 8: `rbee-keeper status` over 1, 8 and 32 sshd nodes, each hive answering on its socket."""

from __future__ import annotations

import time

from bench.fanout import FanoutResult, run

from .common import Context, Row, Section, at_most, med, spread, table

TARGETS = {8: 1.2, 32: 1.5}
TITLE = "9. `rbee-keeper status` over 1/8/32 sshd nodes (streamlocal)"


def section_for(result: FanoutResult) -> Section:
    section = Section("fanout", TITLE)
    one = result.sizes[0]
    for n in result.sizes[1:]:
        target = TARGETS.get(n)
        for which, what in (
            ("cli", "`rbee-keeper status` wall, connections held"),
            ("cold", "the first `rbee-keeper status` (holder starting, N connects)"),
            ("fan", "the fan-out alone, direct connects (in process: connect + socket round trip)"),
        ):
            series = {"cli": result.cli, "cold": result.cold, "fan": result.fan}[which]
            ratio = result.ratio(n, which)
            section.rows.append(
                Row(
                    f"{n} nodes vs {one}: {what}",
                    f"{med(series[n]):.2f} vs {med(series[one]):.2f} s",
                    f"{ratio:.2f}×",
                    f"≤ {target}×" if target else "—",
                    at_most(ratio, target) if target else "—",
                )
            )
    section.body.append(
        f"`bench/fanout.py`: {max(result.sizes)} real sshd processes on 127.0.0.2…, each node its own home "
        "with a running hive (started four at a time in "
        f"{result.hive_start_s:.0f} s). A running hive answers `status` on its Unix socket, read over an "
        "SSH streamlocal channel of the node's connection: one round trip per node, no process on the "
        "node. The keeper keeps its SSH connections open between runs in its connection holder (the "
        "default, `RBEE_SSH_PERSIST` seconds after the last use, like OpenSSH's ControlPersist). *CLI* "
        "is a whole `rbee-keeper --json status` process while the holder holds the N connections; "
        "*cold* the same right after the holder was stopped (it starts again and connects to every "
        "node); *fan-out* is direct connects in process, no holder (`TransportPool` + "
        "`NodeClient.hive_status`, connects included). Every answer "
        f"said `via: socket`. {len(result.cli[one])} repetitions, the order of N rotated; ratios are "
        "medians of per-repetition ratios. 1-minute load average "
        f"{result.load[0]:.1f} at the start, {result.load[1]:.1f} at the end."
    )
    section.body.append(
        table(
            ["nodes", "CLI wall s", "CLI / 1 node", "cold CLI s", "cold / 1 node", "fan-out s",
             "fan-out / 1 node", "CLI per repetition", "cold per repetition"],
            [[n, f"{med(result.cli[n]):.2f}", f"{result.ratio(n):.2f}", f"{med(result.cold[n]):.2f}",
              f"{result.ratio(n, 'cold'):.2f}", f"{med(result.fan[n]):.2f}", f"{result.ratio(n, 'fan'):.2f}",
              spread(result.cli[n], 2), spread(result.cold[n], 2)]
             for n in result.sizes],
        )
    )  # fmt: skip
    return section


def part_fanout(ctx: Context) -> Section:
    started = time.perf_counter()
    section = section_for(run(ctx.tmp / "fanout", ctx.reps(5, 2)))
    section.seconds = time.perf_counter() - started
    return section


def section_markdown(result: FanoutResult) -> str:
    """The section as `bench.report` renders it (summary rows first), for a run of `bench/fanout.py`."""
    section = section_for(result)
    lines = ["| part | what | measured | ratio | target | met? |", "|---|---|---|---|---|---|"]
    part = TITLE.split(".", 1)[0]
    for r in section.rows:
        lines.append(f"| {part} | {r.what} | {r.measured} | {r.ratio} | {r.target} | {r.verdict} |")
    lines += ["", f"## {section.title}", ""]
    for paragraph in section.body:
        lines += [paragraph, ""]
    return "\n".join(lines)
