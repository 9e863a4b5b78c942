"""Continuous batching: what N concurrent streaming clients get from one model copy.

Three servers load SmolLM2 side by side (same threads, same context per
sequence) and take turns, round by round, so drift and other load on the
machine hit all of them alike:

- `worker --slots 4`: rbee's worker, one model copy, the batching engine;
- `worker --slots 1`: one sequence at a time, further clients queue;
- `llama-server -np 4`: llama.cpp's own server (continuous batching, 4 slots),
  built from the llama.cpp sources vendored in the installed llama-cpp-python
  version (`GGML_NATIVE=OFF`, like the wheel). The first run downloads that
  sdist into ~/.cache/rbee and builds only the `llama-server` target (several
  minutes on two cores); the binary is cached under ~/.cache/rbee/.

Every client streams one request of `--tokens` tokens (64) with greedy sampling
and its own prompt (no server can reuse another client's prompt cache). For 1, 4
and 8 clients it prints, per round and as medians over rounds, the aggregate
tokens/s (all tokens of a round / its wall time) and the p50 time to first
token as the client saw it (queueing included), then each server's resident
memory after load and after the runs. The last line is

    aggregate ratio worker/llama-server at 4 clients: X.XX

(worker = `--slots 4`; above 1 the worker is faster). Everything listens on
127.0.0.1; every loop is bounded; every server started here is stopped on exit.

    python bench/batching.py [--rounds 3] [--tokens 64] [--threads 2] [--ctx 1024]
                             [--clients 1,4,8] [--llama-server PATH | --no-llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from native_server import (  # bench/: this script's directory is on sys.path
    llama_cpp_version,
    llama_server_binary,
)
from worker_overhead import (
    HOST,
    Deadline,
    Sample,
    Server,
    free_port,
    median,
    run_llama_server_sse,
    run_worker_sse,
    smollm2_path,
    start_worker,
)

from rbee_worker.protocol.request import InferenceRequest

READY_TIMEOUT_S = 300.0
TOPICS = [
    "a bee who lost her way home", "the oldest oak in the valley", "a lighthouse keeper's last night",
    "a city built on stilts", "the first snow of the year", "a clockmaker and her apprentice",
    "a river that ran backwards", "two robots learning to cook", "a fox who collected keys",
    "the night market in the rain", "a letter that arrived fifty years late", "a garden on the moon",
]  # fmt: skip


# ---------------------------------------------------------------- llama-server


def start_llama_server(
    binary: Path, model: Path, *, threads: int, ctx: int, slots: int, log_dir: Path, cache_type: str = "f16"
) -> Server:
    port = free_port()
    args = [
        str(binary), "--model", str(model), "--host", HOST, "--port", str(port),
        "--threads", str(threads), "--threads-batch", str(threads),
        "--ctx-size", str(ctx * slots), "--parallel", str(slots), "--no-webui", "--no-warmup",
        "--cache-type-k", cache_type, "--cache-type-v", cache_type,
        *(["--flash-attn", "on"] if cache_type != "f16" else []),
    ]  # fmt: skip
    return Server("llama-server", args, port=port, log_dir=log_dir, env=dict(os.environ), headers={})


# ------------------------------------------------------------------ measurement


@dataclasses.dataclass(frozen=True, slots=True)
class Round:
    samples: list[Sample]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def aggregate(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan


@dataclasses.dataclass(slots=True)
class Side:
    name: str
    server: Server
    client: httpx.AsyncClient
    worker: bool
    rss_loaded: int = 0
    rounds: dict[int, list[Round]] = dataclasses.field(default_factory=dict)

    def rss(self) -> int:
        return int(psutil.Process(self.server.proc.pid).memory_info().rss)

    async def call(self, req: InferenceRequest) -> Sample:
        if self.worker:
            return await run_worker_sse(self.client, req)
        return await run_llama_server_sse(self.client, req)


def request(k: int, tokens: int) -> InferenceRequest:
    prompt = f"Write a short story about {TOPICS[k % len(TOPICS)]}.\n\nOnce upon a time,"
    return InferenceRequest(prompt=prompt, max_tokens=tokens, temperature=0.0, top_p=1.0, top_k=0, seed=k)


async def run_round(side: Side, clients: int, tokens: int, offset: int) -> Round:
    reqs = [request(offset + k, tokens) for k in range(clients)]
    started = time.perf_counter()
    samples = await asyncio.gather(*(side.call(r) for r in reqs))
    return Round(list(samples), time.perf_counter() - started)


ROW = "{run:>5} {server:<18} {clients:>7} {agg:>10} {ttft:>12} {tokens:>7}  {stop}"
HEADER = ROW.format(
    run="round", server="server", clients="clients", agg="agg tok/s", ttft="p50 ttft ms", tokens="tokens",
    stop="stop",
)  # fmt: skip


async def measure(sides: list[Side], args: argparse.Namespace, deadline: Deadline) -> None:
    for side in sides:  # warm-up: page cache, first-request code paths
        await run_round(side, 1, args.tokens, 100)
    print(HEADER, flush=True)
    offset = 0
    for i in range(args.rounds):
        if deadline.expired():
            print(f"(time budget of {deadline.seconds:.0f} s spent: stopping after {i} rounds)")
            break
        order = sides if i % 2 == 0 else list(reversed(sides))
        for clients in args.clients:
            offset += clients
            for side in order:
                result = await run_round(side, clients, args.tokens, offset)
                side.rounds.setdefault(clients, []).append(result)
                print(
                    ROW.format(
                        run=i + 1, server=side.name, clients=clients, agg=f"{result.aggregate:.1f}",
                        ttft=f"{median([s.ttft_ms for s in result.samples]):.1f}", tokens=result.tokens,
                        stop=",".join(sorted({s.stop_reason for s in result.samples})),
                    ),
                    flush=True,
                )  # fmt: skip


def summary(sides: list[Side], clients: tuple[int, ...]) -> dict[tuple[str, int], float]:
    print("\nmedians over rounds (agg tok/s: median of per-round aggregates; p50 ttft: over all requests)")
    print(HEADER.replace("round", "     "))
    agg: dict[tuple[str, int], float] = {}
    for n in clients:
        for side in sides:
            rounds = side.rounds.get(n, [])
            agg[(side.name, n)] = median([r.aggregate for r in rounds])
            ttft = median([s.ttft_ms for r in rounds for s in r.samples])
            print(
                ROW.format(
                    run="", server=side.name, clients=n, agg=f"{agg[(side.name, n)]:.1f}", ttft=f"{ttft:.1f}",
                    tokens=sum(r.tokens for r in rounds), stop="",
                )
            )  # fmt: skip
    return agg


# ------------------------------------------------------------------------ main


async def bench(args: argparse.Namespace, tmp: Path) -> int:
    model = smollm2_path()
    version = llama_cpp_version()
    binary = None if args.no_llama_server else args.llama_server or llama_server_binary(version)
    deadline = Deadline(args.budget)
    print(
        f"== {model.name}: {args.tokens} tokens per request, greedy, {args.threads} threads, "
        f"ctx {args.ctx} per sequence, KV cache {args.cache_type}, rounds {args.rounds}, "
        f"llama.cpp of llama-cpp-python {version}",
        flush=True,
    )
    servers: dict[str, Callable[[], Server]] = {
        f"worker --slots {n}": lambda n=n: start_worker(
            model,
            backend="llama-cpp",
            threads=args.threads,
            ctx=args.ctx,
            log_dir=tmp,
            slots=n,
            extra=("--cache-type", args.cache_type),
        )
        for n in (4, 1)
    }
    if binary is not None:
        servers["llama-server -np 4"] = lambda: start_llama_server(
            binary,
            model,
            threads=args.threads,
            ctx=args.ctx,
            slots=4,
            log_dir=tmp,
            cache_type=args.cache_type,
        )
    sides: list[Side] = []
    try:
        for name, start in servers.items():
            server = start()
            worker = name.startswith("worker")
            client = httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300)
            sides.append(Side(name, server, client, worker))
            server.wait_ready("/v1/ready" if worker else "/health", timeout=READY_TIMEOUT_S)
            sides[-1].rss_loaded = sides[-1].rss()
        await measure(sides, args, deadline)
        agg = summary(sides, args.clients)
        print("\nresident memory (MiB): after load / after the runs")
        for side in sides:
            print(f"  {side.name:<18} {side.rss_loaded / 2**20:7.0f} / {side.rss() / 2**20:7.0f}")
        one = sides[1].rss_loaded
        print(f"  worker --slots 4 / --slots 1 after load: {sides[0].rss_loaded / one:.2f}x")
        llama = "llama-server -np 4"
        for n in args.clients:
            batched, single = agg[("worker --slots 4", n)], agg[("worker --slots 1", n)]
            print(f"worker --slots 4 / --slots 1 at {n} client(s): {batched / single:.2f}")
            if binary is not None:
                print(f"worker --slots 4 / {llama} at {n} client(s): {batched / agg[(llama, n)]:.2f}")
        at_4 = 4 in args.clients and binary is not None
        ratio = agg[("worker --slots 4", 4)] / agg[(llama, 4)] if at_4 else math.nan
        print(f"aggregate ratio worker/llama-server at 4 clients: {ratio:.2f}")
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                await side.client.aclose()
            side.server.stop()
    return 0


def _clients(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if not values or min(values) < 1 or max(values) > 64:
        raise argparse.ArgumentTypeError("a comma-separated list of 1..64")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    parser.add_argument("--clients", type=_clients, default=(1, 4, 8))
    parser.add_argument("--cache-type", default="f16", choices=("f16", "q8_0", "q4_0"), help="KV cache type")
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds before rounds stop")
    parser.add_argument("--llama-server", type=Path, help="a llama-server binary instead of building one")
    parser.add_argument("--no-llama-server", action="store_true", help="compare the two workers only")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1 or args.threads < 1 or args.ctx < 64:
        parser.error("--rounds, --tokens and --threads must be positive, --ctx at least 64")
    if args.llama_server is not None and not args.llama_server.is_file():
        parser.error(f"no such file: {args.llama_server}")
    return args


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as tmp:
        code = asyncio.run(bench(args, Path(tmp)))
    print(f"(took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
