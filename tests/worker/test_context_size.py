"""Context per sequence: the default and the --ctx-size flag (and its --ctx alias)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_worker.app.server import default_context
from rbee_worker.cli import main

from ..worker_proc import WorkerProcess


@pytest.mark.parametrize(("training", "expected"), [(None, 4096), (2048, 2048), (4096, 4096), (131072, 4096)])
def test_default_context_is_the_models_own_at_most_4096(training: int | None, expected: int) -> None:
    assert default_context(training) == expected


@pytest.mark.parametrize("flag", ["--ctx-size", "--ctx"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_non_positive_context_size_is_a_usage_error(
    flag: str, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_WORKER_API_KEY", "k")
    assert main(["serve", "--model", "m.gguf", flag, value]) == 2
    assert "--ctx-size must be positive" in capsys.readouterr().err


def test_a_non_numeric_context_size_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "m.gguf", "--ctx-size", "big"])
    assert exit_info.value.code == 2
    assert "--ctx-size" in capsys.readouterr().err


@pytest.mark.llama
async def test_ctx_size_sets_the_context_of_each_slot(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = worker_factory(tiny_model, backend="llama-cpp", slots=2, extra=["--ctx-size", "48"])
    worker.wait_ready()
    async with worker.async_client() as client:
        response = await client.post("/v1/inference", json={"prompt": "x" * 60, "max_tokens": 2})
    assert response.status_code == 200 and "do not fit the 48-token context" in response.text
    assert "2 slot(s) of 48 tokens" in worker.log()
