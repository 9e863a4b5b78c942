"""A worker under slowloris: half-sent request heads are closed after the head timeout, and a
normal client is served all along."""

from __future__ import annotations

from pathlib import Path

import httpx

from ..slow_clients import half_open, wait_all_closed
from ..worker_proc import WorkerProcess

HEAD_TIMEOUT = 2.0
ATTACK = 300


def test_half_open_connections_are_closed_while_the_worker_keeps_answering(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = worker_factory(tiny_model, extra=["--head-timeout", str(HEAD_TIMEOUT)])
    worker.wait_ready()
    with half_open(worker.host, worker.port, ATTACK) as held:
        with worker.client() as client:
            assert client.get("/v1/ready").status_code == 200
            answer = client.post("/v1/inference", json={"prompt": "a", "max_tokens": 3})
            assert answer.status_code == 200 and b"event: end" in answer.content
        outcome = wait_all_closed(held, timeout=HEAD_TIMEOUT + 60)
        assert outcome["open"] == 0, outcome
        # most were answered 408 when their head timed out; those over the per-address cap were reset
        assert outcome["408"] >= 100, outcome
    assert httpx.get(f"{worker.url}/health", timeout=10).status_code == 200


def test_an_oversized_request_head_is_refused(worker_factory: type[WorkerProcess], tiny_model: Path) -> None:
    worker = worker_factory(tiny_model)
    worker.wait_ready()
    response = httpx.get(f"{worker.url}/health", headers={"X-Big": "a" * 100_000}, timeout=10)
    assert response.status_code == 431
    assert httpx.get(f"{worker.url}/health", timeout=10).status_code == 200


def test_bad_connection_limits_are_a_usage_error(tiny_model: Path) -> None:
    import subprocess
    import sys

    for flag, value in (("--head-timeout", "0"), ("--max-connections", "0")):
        done = subprocess.run(
            [sys.executable, "-m", "rbee_worker.cli", "serve", "--model", str(tiny_model), flag, value],
            env={"RBEE_WORKER_API_KEY": "k", "PATH": "/usr/bin"}, capture_output=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and b"must be positive" in done.stderr
