"""A per-sequence llama.cpp sampler chain built from a request's sampling settings.

Order, as llama.cpp's own common sampler: logit bias → penalties → top-k →
top-p → temperature → seeded draw (greedy at temperature 0). A grammar is
checked the way llama.cpp's common sampler does it: draw without it, and only
if the grammar rejects the token, mask the whole vocabulary with the grammar
and draw again. Masking every step costs a walk over the whole vocabulary
(49k tokens for SmolLM2, 150k for Qwen) per token; most tokens of a
constrained answer are ones the model would have written anyway. Masking the
whole vocabulary (not the top-k) on a rejection keeps an allowed token
drawable even when a weak model's favourites are all forbidden.
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
        self._grammar: llama_cpp.llama_sampler_p | None = None
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
            self._grammar = grammar_sampler(vocab, s.grammar)
            self._candidates = _Candidates(n_vocab)
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
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))
        grammar, candidates = self._grammar, self._candidates
        logits = _logits(ctx, index, candidates.size)
        token = candidates.draw(self._chain, logits)
        if not candidates.allows(grammar, token):
            token = candidates.draw(self._chain, logits, grammar)
        llama_cpp.llama_sampler_accept(grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def logprobs(self, ctx: llama_cpp.llama_context_p, index: int, token: int, n_vocab: int) -> TokenLogprob:
        """From the model's logits at `index`, before any sampler changed them (as OpenAI reports)."""
        logits = _logits(ctx, index, n_vocab)
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
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def _logits(ctx: llama_cpp.llama_context_p, index: int, n_vocab: int) -> np.ndarray:
    raw = llama_cpp.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ctypes.cast(raw, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class _Candidates:
    """A reusable `llama_token_data_array` over the whole vocabulary, filled from logits with numpy."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data = (llama_cpp.llama_token_data * size)()
        self._view = np.frombuffer(memoryview(self._data), dtype=_TOKEN_DATA)
        self._ids = np.arange(size, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()

    def draw(
        self,
        chain: llama_cpp.llama_sampler_p,
        logits: np.ndarray,
        grammar: llama_cpp.llama_sampler_p | None = None,
    ) -> int:
        """Apply (the grammar, then) the chain to fresh candidates; the chosen token, nothing accepted."""
        view = self._view
        view["id"] = self._ids  # samplers sort and truncate in place
        view["logit"] = logits
        view["p"] = 0.0
        array = llama_cpp.llama_token_data_array(self._data, self.size, -1, False)
        if grammar is not None:
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def allows(self, grammar: llama_cpp.llama_sampler_p, token: int) -> bool:
        one = self._one
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0  # type: ignore[assignment]
        array = llama_cpp.llama_token_data_array(one, 1, -1, False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return bool(np.isfinite(one[0].logit))
