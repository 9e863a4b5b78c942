"""The scheduler thread: one llama context, one batch per step over every running sequence.

Each step puts the next token of every decoding sequence into one `llama_batch`
(each under its own seq_id), fills the rest of the batch with prompt chunks of
newly admitted sequences, runs one `llama_decode`, and samples each sequence
whose logits came out at its batch index with its own sampler chain. A
sequence joins at the next step and leaves — end, stop, cancel — by having its
KV cells removed, so the others never wait for it.
"""

from __future__ import annotations

import logging
import threading

import llama_cpp

from .batch import Batch
from .model import Model
from .sampling import SamplerChain
from .sequence import LogprobSink, Sequence, TokenSink

log = logging.getLogger("rbee.engine")

#: Tokens per decode step; a long prompt goes in chunks of at most this many,
#: so running sequences keep getting a token every step while it loads.
BATCH_TOKENS = 512

_CLOSE_TIMEOUT_S = 60
#: `--cache-type` names → ggml types of the K and V cache
_CACHE_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


class SequenceError(RuntimeError):
    """The engine could not decode a sequence (decode failure, engine closed or broken)."""


class Scheduler:
    """Owns the llama context; `run` from any thread, one sequence per seat (seq_id) at a time."""

    def __init__(
        self,
        model: Model,
        *,
        sequences: int,
        context_per_sequence: int,
        threads: int,
        batch_tokens: int = BATCH_TOKENS,
        cache_type: str = "f16",
    ) -> None:
        if sequences < 1 or context_per_sequence < 1:
            raise ValueError("sequences and context per sequence must be positive")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sequences * context_per_sequence
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = sequences
        # One thread count for single-token and batched steps: a batch of a few
        # decoding sequences is not a prompt, and ggml's extra threads only spin.
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # One KV pool for all sequences: a seat may use any free cell, so n_ctx is
        # shared instead of split into fixed per-sequence streams.
        params.kv_unified = True
        params.type_k = params.type_v = _CACHE_TYPES[cache_type]
        if cache_type != "f16":  # llama.cpp keeps a quantized V cache only with flash attention
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not ctx:
            raise ValueError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        self.sequences = sequences
        self.context_per_sequence = context_per_sequence
        self._ctx = ctx
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(model.vocab))
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = Batch(batch_tokens, sequences)
        self._lock = threading.Condition()
        self._incoming: list[Sequence] = []
        self._seats: set[int] = set()
        self._running: list[Sequence] = []
        self._closed = False
        self._broken: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rbee-engine", daemon=True)
        self._thread.start()

    def run(self, seq_id: int, prompt: list[int], sampler: SamplerChain, sink: TokenSink) -> None:
        """Decode one sequence alongside the others; return when it has ended and its cells are free.

        Tokens reach `sink.on_token` on the scheduler's thread. The sampler is the
        scheduler's from here on and freed when the sequence ends.
        """
        self.wait(self.start(seq_id, prompt, sampler, sink))

    def start(self, seq_id: int, prompt: list[int], sampler: SamplerChain, sink: TokenSink) -> Sequence:
        """Like `run` without waiting; pass the result to `wait`."""
        try:
            if not 0 <= seq_id < self.sequences:
                raise ValueError(f"seq_id {seq_id} outside 0..{self.sequences - 1}")
            if not 0 < len(prompt) <= self.context_per_sequence:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not fit {self.context_per_sequence}")
            seq = Sequence(seq_id, prompt, sampler, sink)
            with self._lock:
                if self._closed or self._broken is not None:
                    raise SequenceError(
                        "the engine is closed" if self._closed else f"the engine failed: {self._broken}"
                    )
                if seq_id in self._seats:
                    raise ValueError(f"seq_id {seq_id} is already running")
                self._seats.add(seq_id)
                self._incoming.append(seq)
                self._lock.notify()
        except BaseException:
            sampler.close()
            raise
        return seq

    def wait(self, seq: Sequence) -> None:
        """Block until `seq` has ended; raise SequenceError if it ended in failure."""
        seq.done.wait()
        if seq.error is not None:
            raise SequenceError(str(seq.error)) from seq.error

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._seats)

    def close(self) -> None:
        """End every sequence, stop the thread, free the context."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("engine thread still busy after %s s; context left allocated", _CLOSE_TIMEOUT_S)
            return
        self._batch.close()
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    # The scheduler thread.

    def _loop(self) -> None:
        try:
            while self._admit():
                self._step()
        except BaseException as exc:
            log.exception("engine thread failed")
            with self._lock:
                self._broken = exc
            for seq in list(self._running):
                self._end(seq, exc)
        with self._lock:
            leftovers, self._incoming = self._incoming, []
        for seq in [*self._running, *leftovers]:
            self._end(seq, SequenceError("the engine is closed"))

    def _admit(self) -> bool:
        """Take newly submitted sequences; sleep while there is nothing to do. False: closing."""
        with self._lock:
            while not self._incoming and not self._running and not self._closed:
                self._lock.wait()
            if self._closed:
                return False
            self._running.extend(self._incoming)
            self._incoming.clear()
        return True

    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        for seq in [s for s in self._running if s.sink.cancelled]:
            self._end(seq)
        for seq in [s for s in self._running if s.pos >= self.context_per_sequence]:
            self._end(
                seq, SequenceError(f"the sequence filled its {self.context_per_sequence}-token context")
            )
        members: list[Sequence] = []
        for seq in self._running:
            if seq.next_token is not None:
                seq.sample_at = batch.add(seq.next_token, seq.pos, seq.seq_id, logits=True)
                seq.pos += 1
                members.append(seq)
        for seq in self._running:
            if not seq.prefilling or not batch.room:
                continue
            last = min(len(seq.prompt), seq.fed + batch.room) - 1
            for k in range(seq.fed, last + 1):
                index = batch.add(seq.prompt[k], seq.pos, seq.seq_id, logits=k == len(seq.prompt) - 1)
                seq.pos += 1
            seq.fed = last + 1
            seq.sample_at = -1 if seq.prefilling else index
            members.append(seq)
        if not members:
            return
        code = llama_cpp.llama_decode(self._ctx, batch.raw)
        if code != 0:
            error = SequenceError(f"llama_decode returned {code} for a batch of {len(batch)} tokens")
            for seq in members:
                self._end(seq, error)
            return
        for seq in members:
            if seq.sample_at < 0:
                continue
            token = seq.sampler.sample(self._ctx, seq.sample_at)
            try:
                if seq.sampler.top_logprobs is not None and isinstance(seq.sink, LogprobSink):
                    seq.sink.on_logprob(seq.sampler.logprobs(self._ctx, seq.sample_at, token, self._n_vocab))
                seq.sample_at = -1
                keep = seq.sink.on_token(token)
            except Exception as exc:
                self._end(seq, exc)
                continue
            if keep:
                seq.next_token = token
            else:
                self._end(seq)

    def _end(self, seq: Sequence, error: BaseException | None = None) -> None:
        if self._ctx is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        seq.sampler.close()
        if seq in self._running:
            self._running.remove(seq)
        seq.error = error
        with self._lock:
            self._seats.discard(seq.seq_id)
        seq.done.set()
