"""llama-cpp-python for embeddings: the model's weights and a pooling context, no generation engine.

A worker started with `--embedding` loads this instead of `LlamaCppRuntime`: it
never samples, so it runs no scheduler thread and keeps no KV cache per slot.
"""

from __future__ import annotations

from ..engine.embedder import Embedder
from ..engine.model import Model
from .base import ProgressCallback

NAME = "llama-cpp"


class LlamaEmbeddingRuntime:
    name = NAME

    def __init__(
        self,
        path: str,
        *,
        context_length: int,
        threads: int,
        progress: ProgressCallback,
        pooling: str = "auto",
        gpu_layers: int = 0,
        main_gpu: int = 0,
    ) -> None:
        progress(0.0)
        self._model = Model(path, gpu_layers=gpu_layers, main_gpu=main_gpu, progress=progress)
        try:
            self._embedder = Embedder(
                self._model, context_length=context_length, threads=threads, pooling=pooling
            )
        except BaseException:
            self._model.close()
            raise
        progress(1.0)

    @property
    def context_length(self) -> int:
        return self._embedder.context_length

    @property
    def dimensions(self) -> int:
        return self._embedder.dimensions

    @property
    def pooling(self) -> str:
        return self._embedder.pooling

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Unit vectors, one per token list (each 1..context_length tokens)."""
        return [vector.tolist() for vector in self._embedder.embed(inputs)]

    def close(self) -> None:
        self._embedder.close()
        self._model.close()
