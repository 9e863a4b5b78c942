"""A per-sequence llama.cpp sampler chain built from a request's sampling settings.

Order, as llama.cpp's own common sampler: logit bias → penalties → grammar →
top-k → top-p → temperature → seeded draw (greedy at temperature 0). The
grammar sits before the truncating samplers so that it masks the whole
vocabulary: a weak model's favourite tokens may all be forbidden, and the
allowed one must still be drawable.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass, field

import llama_cpp
import numpy as np


@dataclass(frozen=True, slots=True)
class SamplerSettings:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: GBNF text with a `root` rule
    grammar: str | None = None
    #: None: no log-probabilities; n: the chosen token's and the n most likely
    top_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The model's log-probability of the chosen token and of its most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class GrammarError(ValueError):
    """llama.cpp refused the grammar (it does not parse, or it is left-recursive)."""


def grammar_sampler(vocab: llama_cpp.llama_vocab_p, grammar: str) -> llama_cpp.llama_sampler_p:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise GrammarError("llama.cpp could not parse the grammar (a syntax error, or left recursion)")
    return sampler


def check_grammar(vocab: llama_cpp.llama_vocab_p, grammar: str) -> None:
    """Raise GrammarError unless llama.cpp accepts `grammar`."""
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, grammar))


class SamplerChain:
    """One sequence's samplers; `sample` draws a token and records it (penalties, grammar state)."""

    def __init__(
        self,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        *,
        settings: SamplerSettings | None = None,
        vocab: llama_cpp.llama_vocab_p | None = None,
    ) -> None:
        s = settings or SamplerSettings(temperature, top_p, top_k, seed)
        self.top_logprobs = s.top_logprobs
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain = chain
        try:
            self._build(chain, s, vocab)
        except BaseException:
            self.close()
            raise

    def _build(
        self, chain: llama_cpp.llama_sampler_p, s: SamplerSettings, vocab: llama_cpp.llama_vocab_p | None
    ) -> None:
        add = llama_cpp.llama_sampler_chain_add
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab)) if vocab is not None else 0
        if s.logit_bias and vocab is not None:
            entries = [(t, b) for t, b in s.logit_bias.items() if 0 <= t < n_vocab]  # the worker checked
            biases = (llama_cpp.llama_logit_bias * len(entries))()
            for i, (token, bias) in enumerate(entries):
                biases[i].token, biases[i].bias = token, bias  # type: ignore[assignment]
            add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(entries), biases))
        if s.repeat_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
            # The binding declares (n_vocab, last_n, repeat, freq, present), llama.cpp's header has
            # since dropped n_vocab. Integers and floats travel in separate registers, so passing
            # last_n twice gives the C side last_n whichever of the two signatures it was built with.
            last_n = s.penalty_last_n
            penalties = llama_cpp.llama_sampler_init_penalties(
                last_n, last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
            )
            add(chain, penalties)
        if s.grammar is not None:
            if vocab is None:
                raise GrammarError("a grammar needs the model's vocabulary")
            add(chain, grammar_sampler(vocab, s.grammar))
        if s.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return
        draw_seed = s.seed if s.seed is not None else random.randrange(2**31)
        for sampler in (
            llama_cpp.llama_sampler_init_top_k(s.top_k),
            llama_cpp.llama_sampler_init_top_p(s.top_p, 1),
            llama_cpp.llama_sampler_init_temp(s.temperature),
            llama_cpp.llama_sampler_init_dist(draw_seed),
        ):
            add(chain, sampler)

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        """Draw from the logits at batch `index` and record the choice in the chain."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))

    def logprobs(self, ctx: llama_cpp.llama_context_p, index: int, token: int, n_vocab: int) -> TokenLogprob:
        """From the model's logits at `index`, before any sampler changed them (as OpenAI reports)."""
        raw = llama_cpp.llama_get_logits_ith(ctx, index)
        logits = np.ctypeslib.as_array(ctypes.cast(raw, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        top: tuple[tuple[int, float], ...] = ()
        n = self.top_logprobs or 0
        if n:
            best = np.argpartition(-logits, n - 1)[:n]
            best = best[np.argsort(-logits[best])]
            top = tuple((int(t), float(logits[t]) - log_total) for t in best)
        return TokenLogprob(token, float(logits[token]) - log_total, top)

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
