"""A per-sequence llama.cpp sampler chain built from a request's sampling settings."""

from __future__ import annotations

import random

import llama_cpp


class SamplerChain:
    """top-k → top-p → temperature → seeded draw; greedy at temperature 0.

    The order and the seed's use match llama-cpp-python's `Llama` sampler with
    min_p 0 and no penalties, so one request's text does not depend on which path ran it.
    """

    def __init__(self, temperature: float, top_p: float, top_k: int, seed: int | None) -> None:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            draw_seed = seed if seed is not None else random.randrange(2**31)
            for sampler in (
                llama_cpp.llama_sampler_init_top_k(top_k),
                llama_cpp.llama_sampler_init_top_p(top_p, 1),
                llama_cpp.llama_sampler_init_temp(temperature),
                llama_cpp.llama_sampler_init_dist(draw_seed),
            ):
                llama_cpp.llama_sampler_chain_add(chain, sampler)
        self._chain = chain

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        """Draw from the logits at batch `index` and record the choice in the chain."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
