"""A real queen on a free loopback port (uvicorn in the test's event loop) and real workers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette

from rbee_control.queen import QueenSettings, StaticFleet, create_app
from rbee_control.queen.fleet import Fleet
from rbee_control.queen.state import QueenState
from rbee_worker.app.server import bind_socket
from rbee_worker.tinymodel import write_tiny_model

from ..worker_proc import WorkerProcess

QUEEN_KEY = "queen-test-key"
ADMIN_KEY = "queen-test-admin-key"


@dataclass
class Queen:
    url: str
    api_key: str | None
    app: Starlette
    admin_key: str | None = ADMIN_KEY
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def state(self) -> QueenState:
        return self.app.state.queen

    def openai(self, api_key: str | None = None, **kwargs: Any) -> openai.AsyncOpenAI:
        """The official SDK; no retries, so a 503 is seen as a 503."""
        options: dict[str, Any] = {"max_retries": 0, "timeout": 60.0, **kwargs}
        client = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "none", **options
        )
        self.clients.append(client)
        return client

    def http(self) -> httpx.AsyncClient:
        """A client-plane client (the client key)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60)

    def admin(self) -> httpx.AsyncClient:
        """An admin-plane client (the admin key): registration and the worker table."""
        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60)

    async def register(self, worker: WorkerProcess, model: str, node: str = "local", **extra: Any) -> dict:
        async with self.admin() as client:
            body = {"url": worker.url, "api_key": worker.api_key, "model": model, "node": node, **extra}
            response = await client.post("/v2/workers/register", json=body)
        assert response.status_code == 201, response.text
        return response.json()


@contextlib.asynccontextmanager
async def serve_queen(
    fleet: Fleet | None = None,
    *,
    api_key: str | None = QUEEN_KEY,
    admin_key: str | None = ADMIN_KEY,
    settings: QueenSettings | None = None,
    **app_options: Any,
) -> AsyncIterator[Queen]:
    """`app_options` go to `create_app` as they are (`upstreams=`, `upstream_keys=`)."""
    app = create_app(
        fleet or StaticFleet(), api_key=api_key, admin_key=admin_key, settings=settings, **app_options
    )
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        running = Queen(f"http://127.0.0.1:{sock.getsockname()[1]}", api_key, app, admin_key)
        try:
            yield running
        finally:
            for client in running.clients:
                await client.close()
    finally:
        server.should_exit = True
        async with asyncio.timeout(20):
            await task
        sock.close()


@pytest.fixture
async def queen() -> AsyncIterator[Queen]:
    async with serve_queen() as running:
        yield running


def start_worker(model: Path, log_dir: Path, **kwargs: Any) -> WorkerProcess:
    worker = WorkerProcess(model, log_dir=log_dir, **kwargs)
    try:
        worker.wait_ready()
    except BaseException:
        worker.kill()
        raise
    return worker


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    """`alpha`: the tiny model; `alpha-copy`: the same file under another name; `beta`: other weights."""
    root = tmp_path_factory.mktemp("queen-models")
    alpha = shutil.copy(tiny_model, root / "alpha.gguf")
    copy = shutil.copy(tiny_model, root / "alpha-copy.gguf")
    beta = write_tiny_model(root / "beta.gguf", seed=1)
    return {"alpha": Path(alpha), "alpha-copy": Path(copy), "beta": beta}


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[dict[str, WorkerProcess]]:
    """Two one-slot workers on two different models, shared by a module's tests."""
    log_dir = tmp_path_factory.mktemp("pair")
    workers: dict[str, WorkerProcess] = {}
    try:
        for name in ("alpha", "beta"):
            workers[name] = start_worker(model_files[name], log_dir, ctx=4096)
        yield workers
    finally:
        for worker in workers.values():
            worker.kill()


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples whose `name{labels}` starts with `name`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total
