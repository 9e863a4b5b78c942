"""llama-cpp-python: the default runtime, for every architecture llama.cpp loads."""

from __future__ import annotations

import random
from collections.abc import Iterator

from .base import ProgressCallback, SamplingParams

NAME = "llama-cpp"


class LlamaCppRuntime:
    name = NAME

    def __init__(
        self, path: str, *, context_length: int, threads: int | None, progress: ProgressCallback
    ) -> None:
        from llama_cpp import Llama

        progress(0.0)
        self._llm = Llama(
            model_path=path,
            n_ctx=context_length,
            n_threads=threads,
            n_gpu_layers=0,
            verbose=False,
        )
        self._eos = self._llm.token_eos()
        self._eot = {self._eos, *self._end_of_turn_tokens()}
        progress(1.0)

    def _end_of_turn_tokens(self) -> set[int]:
        import llama_cpp

        vocab = self._llm._model.vocab
        eot = llama_cpp.llama_vocab_eot(vocab)
        return {eot} if eot >= 0 else set()

    @property
    def context_length(self) -> int:
        return int(self._llm.n_ctx())

    def tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode(), add_bos=True, special=True)

    def token_bytes(self, token: int) -> bytes:
        return self._llm._model.detokenize([token])

    def is_eos(self, token: int) -> bool:
        return token in self._eot

    def generate(self, prompt_tokens: list[int], params: SamplingParams) -> Iterator[int]:
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        self._llm.set_seed(seed)
        yield from self._llm.generate(
            prompt_tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            temp=params.temperature,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        )

    def close(self) -> None:
        self._llm.close()
