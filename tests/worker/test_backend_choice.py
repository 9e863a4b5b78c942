"""`auto` is llama-cpp for every architecture; ctransformers runs only when asked for by name."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from rbee_worker.gguf_info import GGUFInfo, read_gguf_info
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.runtimes import choose_backend

from ..worker_proc import WorkerProcess


@pytest.fixture
def tiny_info(tiny_model: Path) -> GGUFInfo:
    info = read_gguf_info(tiny_model)
    assert (info.architecture, info.tokenizer_model) == ("llama", "llama"), "a file ctransformers can load"
    return info


def test_auto_is_llama_cpp_for_every_architecture(tiny_info: GGUFInfo) -> None:
    kinds = [("llama", "llama"), ("llama", "gpt2"), ("qwen2", "gpt2"), ("gemma", None)]
    for architecture, tokenizer in kinds:
        info = dataclasses.replace(tiny_info, architecture=architecture, tokenizer_model=tokenizer)
        assert choose_backend(info) == choose_backend(info, "auto") == "llama-cpp"


def test_ctransformers_only_when_asked(tiny_info: GGUFInfo) -> None:
    assert choose_backend(tiny_info, "ctransformers") == "ctransformers"


def test_auto_never_falls_back_to_ctransformers(tiny_info: GGUFInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(RbeeError) as refused:
        choose_backend(tiny_info, "auto")
    assert refused.value.code == "BACKEND_NOT_AVAILABLE"
    assert refused.value.hint == "pip install 'rbee[llama]'"
    assert "pip install 'rbee[llama]'" in refused.value.message


def test_ctransformers_not_installed_names_the_extra(
    tiny_info: GGUFInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ctransformers", None)
    with pytest.raises(RbeeError) as refused:
        choose_backend(tiny_info, "ctransformers")
    assert refused.value.code == "BACKEND_NOT_AVAILABLE" and refused.value.status == 422
    assert "needs the ctransformers runtime, which is not installed" in refused.value.message
    assert refused.value.hint == "pip install 'rbee[ctransformers]'"


def test_worker_on_a_llama_file_runs_llama_cpp_by_default(
    worker_factory: type[WorkerProcess], tiny_model: Path
) -> None:
    worker = worker_factory(tiny_model)
    ready = worker.wait_ready()
    assert ready["runtime"] == "llama-cpp" and ready["backend"] == "cpu"
