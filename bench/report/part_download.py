"""Part 7: `rbee-hive models add http://…` against `curl` of the same file from the same server."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.hive.servers import FileServer, Served, serve_in_thread

from .common import (
    RUN_TIMEOUT,
    Context,
    Row,
    Section,
    at_least,
    command_seconds,
    log,
    med,
    plt_module,
    save_figure,
    smollm2,
    spread,
    table,
)


@dataclasses.dataclass
class KnownDigest(Served):
    """A served file whose sha256 (the ETag) is computed once, not on every request."""

    digest: str = ""

    @property
    def sha256(self) -> str:
        return self.digest


def hive_download(url: str, home: Path, sha256: str) -> dict[str, float]:
    """`rbee-hive models add URL` into a fresh home; wall time and the download phase from its events."""
    argv = [str(Path(sys.prefix) / "bin" / "rbee-hive"), "--home", str(home), "--json", "models", "add", url,
            "--name", "smol", "--sha256", sha256]  # fmt: skip
    started = time.perf_counter()
    phases: dict[str, list[float]] = {}
    result: dict[str, Any] | None = None
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded: the process is killed at the timeout below
            now = time.perf_counter() - started
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                data = event.get("data", event)
                if event.get("event") == "progress":
                    phases.setdefault(str(data.get("phase")), []).append(now)
                elif event.get("event") in ("result", "error"):
                    result = event
            if now > RUN_TIMEOUT:
                break
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or result is None or result.get("event") != "result":
        raise RuntimeError(f"rbee-hive models add failed ({proc.returncode}): {result}")
    download = phases.get("download", [])
    return {
        "wall": wall,
        "download": (max(download) - min(download)) if len(download) > 1 else math.nan,
        "first_byte": min(download) if download else math.nan,
        "verify": (max(phases["verify"]) - min(phases["verify"]))
        if len(phases.get("verify", [])) > 1
        else 0.0,
    }


def hive_fixed_cost(home: Path) -> float:
    """Wall time of a hive command that moves no bytes (`models list` on an empty home)."""
    return command_seconds(
        [str(Path(sys.prefix) / "bin" / "rbee-hive"), "--home", str(home), "--json", "models", "list"]
    )


def part_download(ctx: Context) -> Section:
    section = Section("download", "7. Hive download vs `curl` (same file, same local server)")
    model = smollm2()
    size = model.stat().st_size
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    base = ctx.tmp / "download"
    base.mkdir()
    server = FileServer()
    reps = ctx.reps(5, 2)
    hive: list[dict[str, float]] = []
    curl: list[dict[str, float]] = []
    fixed: list[float] = []
    with serve_in_thread(server.app()) as url:
        server.url = url
        server.files["smol.gguf"] = KnownDigest(model, digest=digest)
        file_url = f"{url}/files/smol.gguf"
        httpx.get(file_url, timeout=60, trust_env=False).raise_for_status()  # warm the page cache and server
        for rep in range(reps):
            order = ("hive", "curl", "fixed") if rep % 2 == 0 else ("fixed", "curl", "hive")
            for side in order:
                home = base / f"home-{rep}-{side}"
                if side == "hive":
                    hive.append(hive_download(file_url, home, digest))
                elif side == "fixed":
                    fixed.append(hive_fixed_cost(home))
                else:
                    out = base / "curl.gguf"
                    t0 = time.perf_counter()
                    got = subprocess.run(
                        ["curl", "-sS", "--fail", "--noproxy", "*", "-o", str(out), "-w",
                         "%{time_starttransfer} %{time_total}", file_url],
                        check=True, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                    )  # fmt: skip
                    wall = time.perf_counter() - t0
                    first, total = (float(v) for v in got.stdout.split())
                    if out.stat().st_size != size:
                        raise RuntimeError("curl got a short file")
                    out.unlink()
                    curl.append({"wall": wall, "download": total - first, "first_byte": first})
                shutil.rmtree(home, ignore_errors=True)
            log(f"download: repetition {rep + 1}/{reps} done")
    mb = size / 1e6
    hive_wall, curl_wall = med([h["wall"] for h in hive]), med([c["wall"] for c in curl])
    hive_dl = med([h["download"] for h in hive])
    ratio_wall = med([c["wall"] / h["wall"] for h, c in zip(hive, curl, strict=True)])
    ratio_dl = med([c["wall"] / h["download"] for h, c in zip(hive, curl, strict=True)])
    section.rows.append(
        Row(
            "`rbee-hive models add http:` (whole command) vs `curl -o`",
            f"{mb / hive_wall:.0f} vs {mb / curl_wall:.0f} MB/s ({hive_wall:.2f} vs {curl_wall:.2f} s)",
            f"{ratio_wall:.2f}×",
            "— (none set; judged against 0.8× as for SFTP vs scp)",
            at_least(ratio_wall, 0.8),
        )
    )
    section.rows.append(
        Row(
            "hive download phase alone (first to last `download` event) vs `curl -o`",
            f"{mb / hive_dl:.0f} vs {mb / curl_wall:.0f} MB/s",
            f"{ratio_dl:.2f}×",
            "— (none set; judged against 0.8× as for SFTP vs scp)",
            at_least(ratio_dl, 0.8),
        )
    )
    section.body.append(
        f"The SmolLM2 GGUF ({mb:.0f} MB; a real model file, as the hive validates the GGUF header) "
        "served by tests/hive/servers.py's Starlette file server (uvicorn, 1 MiB chunks, in a thread of "
        f"this process, its sha256 ETag computed once) on 127.0.0.1; {reps} repetitions per side, "
        "alternating. The hive command writes `<home>/models/smol.gguf.part`, hashing (sha256) each chunk "
        "as it writes it, checks the GGUF header, renames the file and writes the catalog row; curl only "
        "writes the file. *to first "
        "byte* is until the hive's first `download` progress event (curl: `time_starttransfer`); "
        "*download* the span of the `download` events (throttled, so approximate); *after* the rest "
        "(GGUF check, rename, catalog, exit). *fixed cost* is `rbee-hive models list` on an empty home: "
        "what any hive command costs before it moves a byte."
    )
    hive_first = med([h["first_byte"] for h in hive])
    hive_after = med([h["wall"] - h["first_byte"] - h["download"] for h in hive])
    section.body.append(
        table(
            ["side", "wall s", "MB/s (wall)", "to first byte s", "download s", "after s",
             "wall per repetition"],
            [
                ["rbee-hive models add", f"{hive_wall:.2f}", f"{mb / hive_wall:.0f}", f"{hive_first:.2f}",
                 f"{hive_dl:.2f}", f"{hive_after:.2f}", spread([h["wall"] for h in hive], 2)],
                ["curl -o", f"{curl_wall:.2f}", f"{mb / curl_wall:.0f}",
                 f"{med([c['first_byte'] for c in curl]):.2f}", f"{med([c['download'] for c in curl]):.2f}",
                 "", spread([c["wall"] for c in curl], 2)],
                ["fixed cost: rbee-hive models list", f"{med(fixed):.2f}", "", "", "", "", spread(fixed, 2)],
            ],
        )
    )  # fmt: skip
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    bars = {
        "rbee-hive models add": {"to first byte": hive_first, "download": hive_dl, "after": hive_after},
        "curl -o": {
            "to first byte": med([c["first_byte"] for c in curl]),
            "download": med([c["download"] for c in curl]),
            "after": 0.0,
        },
        "rbee-hive models list": {"to first byte": med(fixed), "download": 0.0, "after": 0.0},
    }
    for y, phases in enumerate(bars.values()):
        x = 0.0
        for k, (phase, value) in enumerate(phases.items()):
            ax.barh(y, value, left=x, color=f"C{k}", label=phase if y == 0 else None)
            x += value
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median)")
    ax.set_title(f"download of a {mb:.0f} MB GGUF from a local HTTP server")
    ax.legend(fontsize=8)
    save_figure(ctx, fig, "bench-download.png", section)
    return section
