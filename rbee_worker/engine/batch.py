"""One `llama_batch`, refilled every step with tokens of many sequences."""

from __future__ import annotations

import llama_cpp


class Batch:
    """Up to `capacity` tokens, each tagged with its position and sequence id."""

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, n_seq_max)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def room(self) -> int:
        return self.capacity - self._size

    def clear(self) -> None:
        self._size = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, *, logits: bool) -> int:
        """Append one token; return its index, which is where its logits are read."""
        i = self._size
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq_id
        raw.logits[i] = logits
        self._size = i + 1
        raw.n_tokens = self._size
        return i

    def close(self) -> None:
        if self.capacity:
            llama_cpp.llama_batch_free(self.raw)
            self.capacity = 0
