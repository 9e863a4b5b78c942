"""Replicas on demand: a burst of 16 requests against `replicas: {max: 2}` on two nodes.

Two `transport: local` nodes (each its own home, both with the tiny model, or
SmolLM2 with `--smollm2`) behind a real `queen-rbee` with `--scale-after 1`.
One warm-up request cold-starts the first worker; then 16 clients stream at
once. Printed: when the second replica joined (seconds after the burst began),
each request's wait before its first token and the node that served it, and the
median wait of requests that started before and after the second replica
joined. On this 2-core machine both nodes share the cores, so no speed-up is
expected; the figure to watch is the wait before the first token.

    python bench/replicas.py [--clients 16] [--tokens 64] [--smollm2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from worker_overhead import free_port, smollm2_path  # bench/worker_overhead.py, beside this script

from rbee_worker.tinymodel import write_tiny_model

KEY, ADMIN = "bench-client-key", "bench-admin-key"


def keeper(inventory: Path, *args: str) -> None:
    argv = [sys.executable, "-m", "rbee_control.keeper.cli", "--inventory", str(inventory), *args]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)


async def one(client: httpx.AsyncClient, i: int, tokens: int, t0: float) -> tuple[float, float]:
    """(start, seconds to the first token) of one streamed completion, from `t0`."""
    start = time.monotonic() - t0
    body = {"model": "m", "prompt": f"request {i}:", "max_tokens": tokens, "stream": True, "seed": i}
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"queen answered {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic() - t0 - start
    return start, first if first is not None else float("nan")


async def watch_replicas(url: str, t0: float, joined: list[float], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        for _ in range(6000):  # bounded: 10 minutes at 0.1 s
            if stop.is_set():
                return
            listing = (await admin.get("/v2/workers/list")).json()
            if listing["replicas"].get("m", {}).get("workers", 0) >= 2 and not joined:
                joined.append(time.monotonic() - t0)
            await asyncio.sleep(0.1)


async def bench(args: argparse.Namespace, tmp: Path) -> int:
    model = smollm2_path() if args.smollm2 else write_tiny_model(tmp / "tiny.gguf")
    lines = ["nodes:"]
    for name in ("a", "b"):
        (tmp / name).mkdir()
        lines += [f"  {name}:", "    transport: local", f"    home: '{tmp / name}'"]
    lines += ["models:", "  m:", "    replicas: {min: 0, max: 2}"]
    inventory = tmp / "inventory.yaml"
    inventory.write_text("\n".join(lines) + "\n")
    for node in ("a", "b"):
        keeper(inventory, "models", "add", f"file:{model}", "--node", node, "--name", "m")
    port = free_port()
    env = {**os.environ, "RBEE_QUEEN_API_KEY": KEY, "RBEE_QUEEN_ADMIN_KEY": ADMIN}
    argv = [sys.executable, "-m", "rbee_control.queen.cli", "--inventory", str(inventory),
            "--port", str(port), "--scale-after", "1", "--replica-idle-timeout", "600"]  # fmt: skip
    log = (tmp / "queen.log").open("wb")
    queen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
            await one(client, 999, 4, time.monotonic())  # the cold start of the first worker
            t0 = time.monotonic()
            joined: list[float] = []
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_replicas(url, t0, joined, stop))
            results = await asyncio.gather(*(one(client, i, args.tokens, t0) for i in range(args.clients)))
            await asyncio.sleep(0.5)
            stop.set()
            await watcher
        when = joined[0] if joined else None
        print(f"{args.clients} clients, {args.tokens} tokens each, replicas max 2, --scale-after 1")
        print(f"second replica joined: {'never' if when is None else f'{when:.1f} s after the burst began'}")
        for i, (start, wait) in enumerate(results):
            print(f"request {i:>2}: started {start:5.2f} s, waited {wait:6.2f} s for its first token")
        if when is not None:
            # each request's first token after the join: was it waiting longer than one served at once?
            before = [w for s, w in results if s + w < when]
            after = [w for s, w in results if s + w >= when]
            for label, waits in (("before", before), ("after", after)):
                if waits:
                    median = statistics.median(waits)
                    print(
                        f"median wait, first token {label} the join: {median:.2f} s ({len(waits)} requests)"
                    )
        print(f"median wait over all: {statistics.median(w for _, w in results):.2f} s")
    finally:
        queen.terminate()
        queen.wait(120)
        log.close()
        keeper(inventory, "hive", "stop", "--all")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2 instead of the tiny model")
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.tokens <= 1024:
        parser.error("--clients 1..64, --tokens 1..1024")
    with tempfile.TemporaryDirectory(prefix="rbee-bench-replicas-") as tmp:
        return asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
