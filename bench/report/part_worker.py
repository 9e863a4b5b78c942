"""Part 1: the worker's SSE stream against the same runtime driven in process (bench/worker_overhead.py)."""

from __future__ import annotations

import asyncio
import math

from bench import worker_overhead as wo

from .common import (
    Context,
    Row,
    Section,
    at_least,
    below,
    fmt,
    med,
    plt_module,
    save_figure,
    spread,
    table,
)


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
