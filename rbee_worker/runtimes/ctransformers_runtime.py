"""ctransformers (unmaintained, 2023 ggml): only asked for by name, for llama files with an SPM vocabulary."""

from __future__ import annotations

from collections.abc import Iterator
from ctypes import c_int

from .base import ProgressCallback, SamplingParams

NAME = "ctransformers"


def cpu_library(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """Which of ctransformers' builds (avx2, avx, basic) this CPU runs, by ctransformers' own rule.

    Left to itself ctransformers asks py-cpuinfo, which starts a Python subprocess
    that runs lscpu, dmesg and more: about 1 s on every worker start. The kernel's
    flags line says the same at once. None (let ctransformers decide) off Linux.
    """
    try:
        with open(cpuinfo) as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if line is None:
        return None
    flags = set(line.partition(":")[2].split())
    if "avx2" in flags:
        return "avx2"
    if "avx" in flags and "f16c" in flags:
        return "avx"
    return "basic"


class CTransformersRuntime:
    name = NAME
    # Its sampler has a repetition penalty and nothing else: no logit bias, no presence or
    # frequency penalty, no grammar, no log-probabilities. Tools are only text in the prompt.
    features = frozenset({"repeat_penalty", "penalty_last_n", "tools"})

    def __init__(
        self, path: str, *, context_length: int, threads: int | None, progress: ProgressCallback
    ) -> None:
        from ctransformers import LLM, Config

        progress(0.0)
        # ctransformers defaults to a 512-token context whatever the file says.
        config = Config(context_length=context_length, threads=threads or -1, gpu_layers=0, reset=True)
        self._llm = LLM(path, model_type="llama", config=config, lib=cpu_library())
        self._threads = threads or -1
        progress(1.0)

    @property
    def context_length(self) -> int:
        return int(self._llm.context_length)

    def tokenize(self, text: str) -> list[int]:
        # LLM.tokenize sizes its output buffer in characters, so text whose UTF-8 is
        # longer than its character count (CJK, emoji) overflows it. Size by bytes.
        data = text.encode()
        buffer = (c_int * (len(data) + 2))()
        n = self._llm.ctransformers_llm_tokenize(data, True, buffer)
        return list(buffer[:n])

    def token_bytes(self, token: int) -> bytes:
        return self._llm.ctransformers_llm_detokenize(token)

    def is_eos(self, token: int) -> bool:
        return bool(self._llm.is_eos_token(token))

    def generate(self, prompt_tokens: list[int], params: SamplingParams) -> Iterator[int]:
        llm = self._llm
        pending = llm.prepare_inputs_for_generation(prompt_tokens, reset=True)
        llm.eval(pending, threads=self._threads)
        seed = -1 if params.seed is None else params.seed
        while True:
            token = llm.sample(
                top_k=params.top_k,
                top_p=params.top_p,
                temperature=params.temperature,
                repetition_penalty=params.repeat_penalty,
                last_n_tokens=params.penalty_last_n if params.penalty_last_n >= 0 else self.context_length,
                seed=seed,
            )
            yield token
            llm.eval([token], threads=self._threads)

    def close(self) -> None:
        del self._llm
