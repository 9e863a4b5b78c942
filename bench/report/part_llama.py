"""Part 2: the rbee worker against `python -m llama_cpp.server` on SmolLM2, 1/4/8 clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bench import worker_overhead as wo

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
