"""`queen-rbee` as a process: serves registered workers, exits cleanly, leaves them running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..worker_proc import WorkerProcess, free_port

KEY = "cli-queen-key"
ADMIN_KEY = "cli-queen-admin-key"


def _queen(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "queen.log"
    env = {
        **os.environ, "RBEE_QUEEN_API_KEY": KEY, "RBEE_QUEEN_ADMIN_KEY": ADMIN_KEY, "RBEE_INVENTORY": "",
        "RBEE_CONFIG_DIR": str(tmp_path / "config"),
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbee_control.queen", *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    return proc, log


def test_queen_process_serves_then_stops_without_touching_registered_workers(
    tmp_path: Path, worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = worker_factory(tiny_model, ctx=2048)
    worker.wait_ready()
    port = free_port()
    proc, log = _queen(tmp_path, "--no-inventory", "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {KEY}"}
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        limits = httpx.Limits(keepalive_expiry=60)
        with httpx.Client(base_url=url, headers=headers, timeout=30, limits=limits) as client:
            body = {"url": worker.url, "api_key": worker.api_key, "model": "tiny"}
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert client.post("/v2/workers/register", json=body, headers=admin).status_code == 201
            answer = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 5})
            assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
            # Idle past the 5 s that clients (httpx, the openai SDK) keep connections: the queen must not
            # have closed it, or a client's next request could race that close and fail.
            time.sleep(6.5)
            again = client.get("/health")
            streams = [r.extensions["network_stream"] for r in (answer, again)]
            addresses = {stream.get_extra_info("client_addr") for stream in streams}
            assert again.status_code == 200 and len(addresses) == 1, "one connection served both"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
        assert worker.api_key not in log.read_text()
        assert worker.proc.poll() is None
        assert httpx.get(f"{worker.url}/health", timeout=5).status_code == 200
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_missing_inventory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    proc, log = _queen(tmp_path, "--inventory", str(tmp_path / "nope.yaml"), "--port", str(free_port()))
    assert proc.wait(30) == 1
    lines = [line for line in log.read_text().splitlines() if line.startswith("queen-rbee:")]
    assert len(lines) == 1 and "nope.yaml" in lines[0]


def test_log_format_json_writes_one_object_a_line_with_access_fields(
    tmp_path: Path, worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = worker_factory(tiny_model, ctx=2048)
    worker.wait_ready()
    port = free_port()
    proc, log = _queen(tmp_path, "--no-inventory", "--port", str(port), "--log-format", "json")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
            body = {"url": worker.url, "api_key": worker.api_key, "model": "tiny"}
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert client.post("/v2/workers/register", json=body, headers=admin).status_code == 201
            answer = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4})
            assert answer.status_code == 200, answer.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    (access,) = [line for line in lines if line["logger"] == "rbee.access"]
    assert access["model"] == "tiny" and access["tokens_out"] == "4" and access["status"] == "ok"
    assert access["cancelled"] == "false" and access["request_id"] and "duration_ms" in access
