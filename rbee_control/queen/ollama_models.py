"""What Ollama's `/api/tags`, `/api/ps` and `/api/show` say about a model, from the queen's catalog.

The catalog knows a model's file size, sha256, architecture, quantization,
context length and chat template (from its GGUF, read by the hive). It does not
know the parameter count, so `parameter_size` is estimated from the file size
and the quantization's bits per weight, and marked unknown when either is
missing. Registered workers bring only what registration passed.
"""

from __future__ import annotations

from typing import Any

from rbee_worker.protocol.request import InferenceRequest

from .catalog import PublicModel
from .fleet import ModelEntry
from .ollama_api import iso
from .workers import RoutedWorker

#: Bits per weight of llama.cpp's tensor types (block size included), for the parameter estimate.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q8_1": 9.0, "Q6_K": 6.5625,
    "Q5_0": 5.5, "Q5_1": 6.0, "Q5_K": 5.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5,
    "Q3_K": 3.4375, "Q2_K": 2.625, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "IQ3_S": 3.4375,
    "IQ3_XXS": 3.0625, "IQ2_XXS": 2.0625, "IQ2_XS": 2.3125, "IQ2_S": 2.5, "IQ1_S": 1.5625,
}  # fmt: skip
CAPABILITIES = ["completion"]


def estimated_parameters(entry: ModelEntry) -> int | None:
    bits = BITS_PER_WEIGHT.get((entry.quantization or "").upper())
    if not entry.size or bits is None:
        return None
    return int(entry.size * 8 / bits)


def parameter_size(count: int | None) -> str:
    """Ollama's notation: `1.7B`, `135M`; empty when unknown."""
    if count is None:
        return ""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.0f}M"
    return f"{count / 1e3:.0f}K"


def details(entry: ModelEntry) -> dict[str, Any]:
    family = entry.architecture or ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(estimated_parameters(entry)),
        "quantization_level": entry.quantization or "",
    }


def _model(name: str, entry: ModelEntry, started_at: float) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": iso(entry.modified_at or started_at),
        "size": entry.size or 0,
        "digest": entry.digest or "",
        "details": details(entry),
    }


def tags(models: list[PublicModel], started_at: float) -> dict[str, Any]:
    """Every model the queen can serve, loaded or not (a worker is started on first use)."""
    return {"models": [_model(m.id, _richest(m.entries), started_at) for m in models]}


def _richest(entries: tuple[ModelEntry, ...]) -> ModelEntry:
    """Of the same file on several nodes, the entry that says most about it."""
    return max(entries, key=lambda e: sum(v is not None for v in (e.size, e.architecture, e.quantization)))


def running(workers: list[tuple[str, RoutedWorker, ModelEntry]], started_at: float) -> dict[str, Any]:
    """One row per worker; rbee's own fields (node, slots) ride along under `rbee`."""
    rows = []
    for name, worker, entry in workers:
        row = _model(name, entry, started_at)
        row["size_vram"] = 0
        if entry.context_length:
            row["context_length"] = entry.context_length
        row["rbee"] = {
            "worker": worker.id,
            "node": worker.node,
            "slots": worker.capacity,
            "in_flight": worker.in_flight,
        }
        rows.append(row)
    return {"models": rows}


def show(name: str, entry: ModelEntry, started_at: float) -> dict[str, Any]:
    defaults = InferenceRequest(prompt="-")
    parameters = "\n".join(
        f"{key:<16}{value}"
        for key, value in (("temperature", defaults.temperature), ("top_k", defaults.top_k),
                           ("top_p", defaults.top_p))
    )  # fmt: skip
    body: dict[str, Any] = {
        "license": "",
        "modelfile": f"# served by rbee's queen\nFROM {name}\n",
        "parameters": parameters,
        "template": entry.chat_template or "",
        "details": details(entry),
        "model_info": model_info(entry),
        "capabilities": CAPABILITIES,
        "modified_at": iso(entry.modified_at or started_at),
    }
    return body


def model_info(entry: ModelEntry) -> dict[str, Any]:
    """GGUF metadata keys, only those the catalog knows (estimates stay out of it)."""
    info: dict[str, Any] = {}
    if entry.architecture:
        info["general.architecture"] = entry.architecture
        if entry.context_length:
            info[f"{entry.architecture}.context_length"] = entry.context_length
    return info
