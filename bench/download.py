"""The hive's downloader against `curl` on loopback: same ~100 MB file, same server, alternating.

    .venv/bin/python bench/download.py [--mb 100] [--reps 5]

The server is `python -m http.server` in its own process (so it does not share a
GIL with the downloader). The rbee side is `rbee_control.hive.download.download`
writing `<tmp>/x.part` and hashing every byte (sha256) as the hive does; curl only
writes. Prints the medians and `download rbee/curl: X.XX` (curl's time over ours:
1.00 means as fast as curl).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rbee_control.hive.download import RetryPolicy, download
from rbee_control.hive.part_file import PartDigest
from rbee_control.hive.refs import Source
from rbee_worker.protocol.node_events import Emitter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the file server did not start")


def rbee_once(url: str, part: Path, size: int, digest: str) -> float:
    part.unlink(missing_ok=True)
    emitter = Emitter(json_mode=True, out=open(os.devnull, "w"))  # noqa: SIM115 - closed with the process
    hasher = PartDigest(part)

    async def run() -> None:
        async def resolve() -> Source:
            return Source(url=url, filename="x.gguf", size=size)

        await download(resolve, part, emitter, RetryPolicy(attempts=1), hasher)
        if await hasher.finish(emitter) != digest:
            raise RuntimeError("rbee: wrong sha256")

    t0 = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - t0


def curl_once(url: str, out: Path, size: int) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "--noproxy", "*", "-o", str(out), url], check=True, timeout=300)
    wall = time.perf_counter() - t0
    if out.stat().st_size != size:
        raise RuntimeError("curl: short file")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rbee-bench-dl-") as tmp:
        root = Path(tmp)
        served = root / "www"
        served.mkdir()
        data = os.urandom(args.mb * 1_000_000)
        (served / "model.gguf").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
                str(served),
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(port)
            url = f"http://127.0.0.1:{port}/model.gguf"
            curl_once(url, root / "warm", len(data))  # page cache and server warm
            ours, theirs = [], []
            for rep in range(args.reps):
                sides = ("rbee", "curl") if rep % 2 == 0 else ("curl", "rbee")
                for side in sides:
                    if side == "rbee":
                        ours.append(rbee_once(url, root / "x.part", len(data), digest))
                    else:
                        theirs.append(curl_once(url, root / "curl.out", len(data)))
        finally:
            server.terminate()
            server.wait(10)
    mb = len(data) / 1e6
    rbee_s, curl_s = statistics.median(ours), statistics.median(theirs)
    print(f"file {mb:.0f} MB, {args.reps} repetitions each, medians")
    print(f"rbee download+sha256: {rbee_s:.3f} s ({mb / rbee_s:.0f} MB/s)")
    print(f"curl -o:              {curl_s:.3f} s ({mb / curl_s:.0f} MB/s)")
    print(f"download rbee/curl: {curl_s / rbee_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
