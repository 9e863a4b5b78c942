"""GGUF runtimes behind one interface, and the choice between them.

`auto` is llama-cpp-python (the `rbee[llama]` extra) for every architecture:
it is maintained and carries llama.cpp's GGUF parser fixes. ctransformers (the
`rbee[ctransformers]` extra) is a 2023 ggml build that predates the 2024 GGUF
parser overflow fixes, so it runs only when asked for by name, and only
llama-architecture files with an SPM ("llama") vocabulary.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..protocol.errors import ErrorCode, RbeeError
from .base import GrammarRuntime, ProgressCallback, Runtime, RuntimeFactory, SamplingParams, SequenceRunner

if TYPE_CHECKING:
    from ..gguf_info import GGUFInfo

CTRANSFORMERS = "ctransformers"
LLAMA_CPP = "llama-cpp"
BACKENDS = (CTRANSFORMERS, LLAMA_CPP)

__all__ = [
    "BACKENDS",
    "GrammarRuntime",
    "ProgressCallback",
    "Runtime",
    "SamplingParams",
    "SequenceRunner",
    "choose_backend",
    "runtime_factory",
]

_MODULES = {CTRANSFORMERS: "ctransformers", LLAMA_CPP: "llama_cpp"}
_INSTALL_HINT = {CTRANSFORMERS: "pip install 'rbee[ctransformers]'", LLAMA_CPP: "pip install 'rbee[llama]'"}


def ctransformers_can_load(info: GGUFInfo) -> bool:
    return info.architecture == "llama" and info.tokenizer_model in (None, "llama")


def is_installed(backend: str) -> bool:
    return importlib.util.find_spec(_MODULES[backend]) is not None


def choose_backend(info: GGUFInfo, requested: str = "auto") -> str:
    """The backend that will run `info`'s model, or a clear error saying what to install."""
    describe = f"{info.architecture} architecture, {info.tokenizer_model or 'unknown'} tokenizer"
    if requested == "auto":
        backend = LLAMA_CPP  # never ctransformers unasked: it parses untrusted files with 2023 code
    elif requested in BACKENDS:
        backend = requested
    else:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"unknown runtime {requested!r} (choose auto, {', '.join(BACKENDS)})",
            status=400,
        )
    if backend == CTRANSFORMERS and not ctransformers_can_load(info):
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            f"ctransformers cannot run {info.name} ({describe}); use --runtime llama-cpp",
            status=422,
            details={"backend": backend, "architecture": info.architecture},
        )
    if not is_installed(backend):
        raise RbeeError(
            ErrorCode.BACKEND_NOT_AVAILABLE,
            f"{info.name} ({describe}) needs the {backend} runtime, which is not installed: "
            f"{_INSTALL_HINT[backend]}",
            status=422,
            details={"backend": backend, "architecture": info.architecture},
            hint=_INSTALL_HINT[backend],
        )
    return backend


def runtime_factory(backend: str) -> RuntimeFactory:
    if backend == CTRANSFORMERS:
        from .ctransformers_runtime import CTransformersRuntime

        return CTransformersRuntime
    if backend == LLAMA_CPP:
        from .llama_cpp_runtime import LlamaCppRuntime

        return LlamaCppRuntime
    raise ValueError(backend)
