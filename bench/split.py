"""A model split over two llama.cpp RPC servers: rbee's split worker against the whole model, and native.

Two `ggml-rpc-server`s per split side run on 127.0.0.1 (the binary `scripts/setup.sh`
installs beside the venv's Python, built from the same llama.cpp sources as the wheel; a
server serves one client at a time). The sides take turns round by round so drift hits all alike:

- `split worker`: `rbee-worker serve --rpc A,B` (every layer on the two servers);
- `native --rpc`: `llama-server --rpc A,B -ngl 99` (llama.cpp's own split), the binary
  bench/native_server.py builds with GGML_RPC from the same sources (or `--llama-server PATH`;
  `--no-llama-server` skips that side, and the last line says so);
- `whole model`: `rbee-worker serve` with the model on its own CPU.

Each round streams one greedy request of `--tokens` tokens per side and reads
the decode rate between the first and the last token. Printed: per-round tok/s,
medians, whether the texts matched at temperature 0, and last

    split worker / native llama-server --rpc: X.XX   (or: … skipped: …)

All servers listen on 127.0.0.1 and are stopped on exit; every loop is bounded.

    python bench/split.py [--rounds 3] [--tokens 64] [--threads 1] [--ctx 1024]
                          [--llama-server PATH | --no-llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from native_server import llama_cpp_version, llama_server_binary  # bench/ is on sys.path
from worker_overhead import (  # bench/worker_overhead.py: this script's directory is on sys.path
    HOST,
    Sample,
    Server,
    free_port,
    median,
    run_worker_sse,
    smollm2_path,
)

from rbee_control.hive.rpc_servers import find_binary
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.request import InferenceRequest
from rbee_worker.protocol.rpc import hello

PROMPT = "The three most useful things to know about bees are"


class RpcServer:
    def __init__(self, binary: str, threads: int, log_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"{HOST}:{self.port}"
        self.log = (log_dir / f"rpc-{self.port}.log").open("wb")
        args = [binary, "-H", HOST, "-p", str(self.port), "-t", str(threads)]
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def wait(self) -> None:
        for _ in range(200):  # bounded: 20 s
            if self.proc.poll() is not None:
                raise RuntimeError(f"ggml-rpc-server exited with {self.proc.returncode}")
            with contextlib.suppress(RbeeError):
                hello(self.endpoint, timeout=1)
                return
            time.sleep(0.1)
        raise RuntimeError("ggml-rpc-server did not answer")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def start_worker(model: Path, threads: int, ctx: int, log_dir: Path, rpc: list[str]) -> Server:
    port = free_port()
    api_key = secrets.token_urlsafe(16)
    args = [
        sys.executable, "-m", "rbee_worker.cli", "serve", "--model", str(model), "--host", HOST,
        "--port", str(port), "--runtime", "llama-cpp", "--threads", str(threads), "--ctx", str(ctx),
    ]  # fmt: skip
    if rpc:
        args += ["--rpc", ",".join(rpc)]
    env = {**os.environ, "RBEE_WORKER_API_KEY": api_key}
    name = "split-worker" if rpc else "whole-worker"
    return Server(
        name, args, port=port, log_dir=log_dir, env=env, headers={"Authorization": f"Bearer {api_key}"}
    )


def native_supports_rpc(binary: Path | None) -> str | None:
    """None when `binary` can split over RPC servers; otherwise why that side is skipped."""
    if binary is None:
        return "--no-llama-server"
    if not binary.is_file():
        return f"{binary} does not exist"
    # its --help lists --rpc either way; a build without GGML_RPC refuses the option itself
    out = subprocess.run(
        [str(binary), "--rpc", f"{HOST}:1", "--version"], capture_output=True, text=True, timeout=30
    )
    if "RPC not supported" in out.stdout + out.stderr:
        return f"{binary} was built without GGML_RPC"
    return None


def start_native(binary: Path, model: Path, threads: int, ctx: int, log_dir: Path, rpc: list[str]) -> Server:
    port = free_port()
    args = [
        str(binary), "--model", str(model), "--host", HOST, "--port", str(port), "--threads", str(threads),
        "--threads-batch", str(threads), "--ctx-size", str(ctx), "--parallel", "1", "--no-webui",
        "--no-warmup", "--rpc", ",".join(rpc), "-ngl", "99",
    ]  # fmt: skip
    return Server("native-rpc", args, port=port, log_dir=log_dir, env=dict(os.environ), headers={})


async def run_native(client: httpx.AsyncClient, req: InferenceRequest) -> Sample:
    """llama-server's own `/completion` stream: `n_predict` greedy tokens, one SSE event per token."""
    body = {"prompt": req.prompt, "n_predict": req.max_tokens, "temperature": 0.0, "top_k": 1, "stream": True,
            "seed": req.seed, "cache_prompt": False}  # fmt: skip
    parts: list[str] = []
    first_at = last_at = 0.0
    started = time.perf_counter()
    async with asyncio.timeout(300), client.stream("POST", "/completion", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if data.get("content"):
                last_at = time.perf_counter()
                first_at = first_at or last_at
                parts.append(data["content"])
    return Sample((first_at - started) * 1000, len(parts), last_at - first_at, "max_tokens", "".join(parts))


@contextlib.contextmanager
def all_stopped(things: list[RpcServer | Server]) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in reversed(things):  # workers first, then the RPC servers
            thing.stop()


async def bench(args: argparse.Namespace, tmp: Path) -> int:
    model = smollm2_path()
    binary = find_binary()
    skip = native_supports_rpc(args.llama_server)
    started: list[RpcServer | Server] = []
    with all_stopped(started):
        # a pair of servers per split side: a server serves one client at a time
        pairs = [
            [RpcServer(binary, args.threads, tmp) for _ in range(2)] for _ in range(2 if skip is None else 1)
        ]
        for pair in pairs:
            started += pair
            for server in pair:
                server.wait()
        endpoints = [[s.endpoint for s in pair] for pair in pairs]
        sides: dict[str, Server] = {
            "split worker": start_worker(model, args.threads, args.ctx, tmp, endpoints[0]),
            "whole model": start_worker(model, args.threads, args.ctx, tmp, []),
        }
        if skip is None:
            sides["native --rpc"] = start_native(
                args.llama_server, model, args.threads, args.ctx, tmp, endpoints[1]
            )
        started += list(sides.values())
        for name, server in sides.items():
            server.wait_ready("/health" if name.startswith("native") else "/v1/ready")
        req = InferenceRequest(prompt=PROMPT, max_tokens=args.tokens, temperature=0.0, top_k=1, seed=1)
        rates: dict[str, list[float]] = {name: [] for name in sides}
        texts: dict[str, str] = {}
        for round_ in range(1, args.rounds + 1):
            for name, server in sides.items():
                async with httpx.AsyncClient(
                    base_url=server.url, headers=server.headers, timeout=300
                ) as client:
                    sample = await (
                        run_native(client, req) if name.startswith("native") else run_worker_sse(client, req)
                    )
                rates[name].append(sample.tokens_per_s)
                texts.setdefault(name, sample.text)
                print(
                    f"round {round_}  {name:<13} {sample.tokens:>4} tokens  {sample.tokens_per_s:7.1f} tok/s"
                )
        print()
        for name, values in rates.items():
            print(f"median  {name:<13} {median(values):7.1f} tok/s")
        same = texts["split worker"] == texts["whole model"]
        print(f"split worker text == whole model text at temperature 0: {same}")
        if "native --rpc" in texts:
            print(f"split worker text == native --rpc text: {texts['split worker'] == texts['native --rpc']}")
        ratio = median(rates["split worker"]) / median(rates["whole model"])
        print(f"split worker / whole model: {ratio:.2f}")
        if skip is None:
            native = median(rates["native --rpc"])
            value = median(rates["split worker"]) / native if native and math.isfinite(native) else math.nan
            print(f"split worker / native llama-server --rpc: {value:.2f}")
        else:
            print(f"split worker / native llama-server --rpc: skipped: {skip}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="per server (the machine has 2 cores)")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--llama-server", type=Path, help="an RPC-enabled llama-server binary")
    parser.add_argument("--no-llama-server", action="store_true", help="skip the native side")
    args = parser.parse_args()
    if args.llama_server is None and not args.no_llama_server:
        args.llama_server = llama_server_binary(llama_cpp_version())
    if not 1 <= args.rounds <= 20 or not 1 <= args.tokens <= 2048:
        parser.error("--rounds 1..20 and --tokens 1..2048")
    with tempfile.TemporaryDirectory(prefix="rbee-bench-split-") as tmp:
        return asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
