"""uvloop is optional: without it the worker serves on asyncio's own loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rbee_worker.app import event_loop

from ..worker_proc import WorkerProcess
from .sse import collect


def test_choice_follows_what_is_installed() -> None:
    assert event_loop.choose(lambda module: True) == "uvloop"
    assert event_loop.choose(lambda module: module != "uvloop") == "asyncio"
    assert event_loop.importable("json") and not event_loop.importable("rbee_no_such_module")


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_fallback_runs_on_asyncios_own_loop() -> None:
    assert event_loop.loop_factory("asyncio") is None
    assert event_loop.run(_loop_module(), "asyncio").startswith("asyncio")


def test_uvloop_runs_on_uvloop() -> None:
    if not event_loop.importable("uvloop"):
        pytest.skip("uvloop is not installed here")
    assert event_loop.run(_loop_module(), "uvloop").startswith("uvloop")


@pytest.fixture
def without_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PYTHONPATH entry that makes `import uvloop` fail, as on Windows."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "uvloop.py").write_text("raise ImportError('uvloop is not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow), prepend=os.pathsep)
    return shadow


async def test_worker_serves_without_uvloop(
    without_uvloop: Path, worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    chosen = subprocess.run(
        [sys.executable, "-c", "from rbee_worker.app.event_loop import choose; print(choose())"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert chosen.stdout.strip() == "asyncio", chosen
    worker = worker_factory(tiny_model)
    worker.wait_ready()
    async with worker.async_client() as client:
        events = await collect(client, {"prompt": "bee", "max_tokens": 5, "seed": 2})
    assert events[-1].name == "end" and events[-1].data["tokens_out"] == 5
    assert "Traceback" not in worker.log(), worker.log()
