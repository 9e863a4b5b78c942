"""Embeddings from one loaded model: a llama.cpp context with pooling and no sampling.

An embedding worker runs this instead of the batching `Scheduler`: its context
is created with `embeddings` on, so llama.cpp pools each sequence's hidden states
into one vector (the model's own pooling, mean when the model names none).
Several inputs go into one `llama_decode`, each under its own seq_id, as long as
their tokens fit one batch; the KV cells are cleared after every batch, since no
sequence continues. Vectors are L2-normalised, as OpenAI's are, so a dot product
is the cosine similarity.
"""

from __future__ import annotations

import ctypes
import threading

import llama_cpp
import numpy as np

from .batch import Batch
from .model import Model

#: `--pooling` names and llama.cpp's constants; `auto` is the model's own (mean when it has none).
POOLINGS = {
    "auto": llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
}
_POOLING_NAMES = {value: name for name, value in POOLINGS.items() if name != "auto"}

#: Inputs decoded together at most (llama.cpp's `n_seq_max` for this context).
MAX_SEQUENCES = 16


class Embedder:
    """Thread-safe: one batch at a time under a lock, from any thread."""

    def __init__(self, model: Model, *, context_length: int, threads: int, pooling: str = "auto") -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} (choose {', '.join(POOLINGS)})")
        self._model = model
        self.context_length = context_length
        ctx = self._context(POOLINGS[pooling], threads)
        if llama_cpp.llama_pooling_type(ctx) not in _POOLING_NAMES:  # the model pools nothing itself
            llama_cpp.llama_free(ctx)
            ctx = self._context(llama_cpp.LLAMA_POOLING_TYPE_MEAN, threads)
        self._ctx: llama_cpp.llama_context_p | None = ctx
        self.pooling = _POOLING_NAMES[llama_cpp.llama_pooling_type(ctx)]
        self.dimensions = int(llama_cpp.llama_model_n_embd(model.model))
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._encoder_only = bool(
            llama_cpp.llama_model_has_encoder(model.model)
            and not llama_cpp.llama_model_has_decoder(model.model)
        )
        self._batch = Batch(context_length, MAX_SEQUENCES)
        self._lock = threading.Lock()

    def _context(self, pooling_type: int, threads: int) -> llama_cpp.llama_context_p:
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = pooling_type
        # A whole input must be in one micro-batch: pooling sees only what one decode computed.
        params.n_ctx = params.n_batch = params.n_ubatch = self.context_length
        params.n_seq_max = MAX_SEQUENCES
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model.model, params)
        if not ctx:
            raise ValueError(
                f"llama.cpp could not create an embedding context of {self.context_length} tokens"
            )
        return ctx

    def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One unit vector (float32) per token list; every list must hold 1..context_length tokens."""
        for tokens in inputs:
            if not 0 < len(tokens) <= self.context_length:
                raise ValueError(f"an input of {len(tokens)} tokens does not fit {self.context_length}")
        out: list[np.ndarray] = []
        with self._lock:
            if self._ctx is None:
                raise RuntimeError("the embedder is closed")
            start = 0
            while start < len(inputs):
                end = self._fill(inputs, start)
                out += self._decode(end - start)
                start = end
        return out

    def _fill(self, inputs: list[list[int]], start: int) -> int:
        batch = self._batch
        batch.clear()
        end = start
        while end < len(inputs) and end - start < MAX_SEQUENCES and len(inputs[end]) <= batch.room:
            for pos, token in enumerate(inputs[end]):
                batch.add(token, pos, end - start, logits=True)
            end += 1
        return end

    def _decode(self, sequences: int) -> list[np.ndarray]:
        llama_cpp.llama_memory_clear(self._memory, True)
        run = llama_cpp.llama_encode if self._encoder_only else llama_cpp.llama_decode
        code = run(self._ctx, self._batch.raw)
        try:
            if code != 0:
                raise RuntimeError(f"llama.cpp returned {code} computing {sequences} embedding(s)")
            vectors = []
            for seq in range(sequences):
                pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
                if not pointer:
                    raise RuntimeError(f"llama.cpp gave no pooled embedding for sequence {seq}")
                array = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * self.dimensions)).contents
                vector = np.array(array, dtype=np.float32)
                if not np.isfinite(vector).all():  # JSON has no NaN: say so instead of failing to encode
                    raise RuntimeError(f"llama.cpp gave a non-finite embedding for sequence {seq}")
                norm = float(np.linalg.norm(vector))
                vectors.append(vector / norm if norm > 0 else vector)
            return vectors
        finally:
            llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        with self._lock:
            self._batch.close()
            if self._ctx is not None:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
