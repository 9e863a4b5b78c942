"""The weights and vocabulary of one GGUF model, loaded once through llama.cpp's C API."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import llama_cpp

log = logging.getLogger("rbee.engine")

_PIECE_BYTES = 64
_GGML_LOG_LEVEL_ERROR = 4


@llama_cpp.llama_log_callback
def _log_errors_only(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp logs every tensor at load, and with a unified KV cache it warns that the
    # whole pool exceeds the training context, which no one sequence can reach here.
    if level == _GGML_LOG_LEVEL_ERROR:
        log.error("llama.cpp: %s", text.decode(errors="replace").rstrip())


class Model:
    """Loaded weights plus tokenizer; read-only after load, so any thread may tokenize."""

    def __init__(
        self,
        path: str,
        *,
        gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: list[float] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        llama_cpp.llama_log_set(_log_errors_only, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.main_gpu = main_gpu
        if tensor_split:  # one weight per device, in llama.cpp's device order
            size = int(llama_cpp.llama_max_devices())
            if len(tensor_split) > size:
                raise ValueError(f"tensor split names {len(tensor_split)} devices; llama.cpp takes {size}")
            self._tensor_split = (ctypes.c_float * size)(*tensor_split)  # read by the C side during the load
            params.tensor_split = self._tensor_split
        if progress is not None:

            def report(fraction: float, _user: ctypes.c_void_p) -> bool:
                progress(fraction)
                return True

            # Kept on self: the C side calls it during the load below.
            self._progress_cb = llama_cpp.llama_progress_callback(report)
            params.progress_callback = self._progress_cb
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise ValueError(f"llama.cpp could not load {path}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        eos = llama_cpp.llama_vocab_eos(self.vocab)
        eot = llama_cpp.llama_vocab_eot(self.vocab)
        self._end_tokens = {t for t in (eos, eot) if t >= 0}

    @property
    def vocab_size(self) -> int:
        return int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    @property
    def training_context(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self.model))

    def tokenize(self, text: str) -> list[int]:
        """Token ids with BOS (when the vocabulary adds one); special tokens are parsed."""
        data = text.encode()
        size = len(data) + 2
        buffer = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, size, True, True)
        if n < 0:  # more tokens than bytes + 2: only if the vocabulary adds several specials
            size = -n
            buffer = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, size, True, True)
        if n < 0:
            raise ValueError(f"llama.cpp could not tokenize a {len(data)}-byte prompt")
        return list(buffer[:n])

    def token_bytes(self, token: int) -> bytes:
        """The token's text as bytes; special tokens (BOS, EOS, …) have none."""
        buffer = ctypes.create_string_buffer(_PIECE_BYTES)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, _PIECE_BYTES, 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -n, 0, False)
        return buffer.raw[:n]

    def is_eos(self, token: int) -> bool:
        return token in self._end_tokens

    def close(self) -> None:
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None
