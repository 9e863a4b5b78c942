"""Part 3: the queen's relay against the worker directly (bench/relay.py)."""

from __future__ import annotations

import argparse
import asyncio

from bench import relay

from .common import (
    Context,
    Row,
    Section,
    at_least,
    at_most,
    fmt,
    med,
    plt_module,
    save_figure,
    spread,
    table,
)


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
