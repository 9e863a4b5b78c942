"""How much memory a worker will need, and where, before anything loads.

need = weights + KV cache for `slots × ctx` + a compute buffer, split between the
accelerator and the host by how many layers are offloaded — the estimate GPUStack
and Ollama make before they place a model. Pure arithmetic over a `ModelShape`;
the hive refuses a spawn from it, the worker reports from it.

Offload steps follow llama.cpp's `n_gpu_layers`: step k puts the last k repeating
blocks (and their KV cache) on the device; step `n_layers + 1` adds the output
head. The token embedding always stays on the host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .model_shape import ModelShape
from .protocol import spawn
from .protocol.errors import ErrorCode, RbeeError
from .protocol.spawn import DEVICE_BACKENDS, GpuLayers

MB = 1 << 20

#: Bytes per K or V element: llama.cpp's default cache type is f16.
KV_F16 = 2
#: (bytes, elements) of one block of each KV cache type, as ggml stores them
KV_BLOCKS = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}
#: llama.cpp's default micro-batch: the compute buffer is sized for this many tokens at once.
N_UBATCH = 512
#: llama.cpp rounds the KV cache up to a multiple of this many cells.
KV_PAD = 256
#: The per-sequence context when none is asked for: a long training context would reserve GBs of KV.
DEFAULT_CTX_CAP = 4096
BACKENDS = DEVICE_BACKENDS
#: the plan of a split worker: its offload steps land on llama.cpp RPC servers, one pool of memory
SPLIT = "rpc"


def default_ctx(shape: ModelShape) -> int:
    return min(shape.context_length or 2048, DEFAULT_CTX_CAP)


def kv_cells(slots: int, ctx: int) -> int:
    total = slots * ctx
    return -(-total // KV_PAD) * KV_PAD


def kv_bytes(shape: ModelShape, cells: int, layers: int | None = None, cache_type: str = "f16") -> int:
    """K and V for `cells` tokens across `layers` layers (all by default), in `cache_type` blocks."""
    n = shape.n_layers if layers is None else layers
    size, block = KV_BLOCKS[cache_type]
    return n * cells * shape.kv_width * size // block


def compute_bytes(shape: ModelShape, cells: int, n_ubatch: int = N_UBATCH) -> int:
    """The scratch llama.cpp reserves for one micro-batch, after Ollama's estimate for llama-like graphs.

    The larger of the attention scores for `n_ubatch` tokens against the whole cache
    and the logits of `n_ubatch` tokens, plus four hidden states, all f32. On SmolLM2
    this is 1–3 % above what llama.cpp reserves without flash attention at 512, 4096
    and 16384 cells; with flash attention it is an upper bound.
    """
    attention = 4 * n_ubatch * (1 + 4 * shape.n_embd + cells * (1 + shape.n_head))
    logits = 4 * n_ubatch * (shape.n_embd + shape.n_vocab)
    return max(attention, logits) + 4 * n_ubatch * 4 * shape.n_embd


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    backend: str
    device: int | None
    slots: int
    ctx: int
    n_layers: int
    #: offload steps: 0 … n_layers + 1 (the last one adds the output head)
    gpu_layers: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    #: what lands on the accelerator (0 for cpu)
    device_bytes: int
    #: what lands in RAM (for metal, the same unified pool as device_bytes)
    host_bytes: int
    #: the part of host_bytes that is weights (what `ram_headroom` scales)
    host_weights_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.device_bytes + self.host_bytes

    @property
    def full_offload(self) -> bool:
        return self.gpu_layers > self.n_layers

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def check_cache_type(shape: ModelShape, cache_type: str) -> None:
    """Refuse a quantized KV cache the model's heads cannot be stored in (llama.cpp would fail the load)."""
    block = KV_BLOCKS[cache_type][1]
    if block > 1 and (shape.head_dim_k % block or shape.head_dim_v % block):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"a {cache_type} KV cache stores blocks of {block} values; this model's attention heads hold "
            f"{shape.head_dim_k} (K) and {shape.head_dim_v} (V)",
            details={"field": "cache_type", "head_dim_k": shape.head_dim_k, "head_dim_v": shape.head_dim_v},
            hint="--cache-type f16",
        )


def split(
    shape: ModelShape, backend: str, steps: int, cells: int, cache_type: str = "f16"
) -> tuple[int, int, int]:
    """(device bytes, host bytes, host weight bytes) with `steps` offload steps."""
    total_kv = kv_bytes(shape, cells, cache_type=cache_type)
    compute = compute_bytes(shape, cells)
    if backend == "cpu" or steps <= 0:
        host = shape.weights_bytes + total_kv + compute
        return (compute if backend != "cpu" else 0), host, shape.weights_bytes
    layers = min(steps, shape.n_layers)
    on_device = sum(shape.layer_bytes[shape.n_layers - layers :])
    if steps > shape.n_layers:
        on_device += shape.output_bytes
    device_kv = kv_bytes(shape, cells, layers, cache_type)
    device = on_device + device_kv + compute
    # the host keeps the rest of the weights and KV; it computes the logits unless the head is offloaded
    host_compute = 0 if steps > shape.n_layers else 4 * N_UBATCH * (shape.n_embd + shape.n_vocab)
    host = shape.weights_bytes - on_device + (total_kv - device_kv) + host_compute
    return device, host, shape.weights_bytes - on_device


def _on_device(shape: ModelShape, backend: str, steps: int, cells: int, cache_type: str) -> int:
    """What counts against the device's free memory: on Metal's unified memory, the host half too."""
    device, host, _ = split(shape, backend, steps, cells, cache_type)
    return device + host if backend == "metal" else device


def parse_gpu_layers(text: str | int) -> GpuLayers:
    """`auto`, `all` or a count ≥ 0; ValueError otherwise (the CLIs turn it into a usage error)."""
    try:
        return spawn.parse_gpu_layers(text.strip() if isinstance(text, str) else text)
    except RbeeError as exc:
        raise ValueError(exc.message) from None


def plan_memory(
    shape: ModelShape,
    *,
    backend: str,
    slots: int = 1,
    ctx: int | None = None,
    device: int | None = None,
    gpu_layers: GpuLayers = "auto",
    device_free: int | None = None,
    cache_type: str = "f16",
) -> MemoryPlan:
    """Resolve `gpu_layers` and split the need; `auto` offloads as many steps as fit `device_free`.

    Backend `SPLIT` plans a split worker: `device_free` is what its RPC servers have free
    together (llama.cpp spreads the offloaded layers over them by their free memory), and
    the rest — always the token embedding — stays on the worker's node.
    Nothing here refuses: `check_fits` compares a plan with what is free.
    """
    if backend not in (*BACKENDS, SPLIT):
        raise ValueError(f"backend {backend!r}")
    per_seq = ctx or default_ctx(shape)
    cells = kv_cells(slots, per_seq)
    last = shape.n_layers + 1
    if backend == "cpu":
        steps = 0
    elif gpu_layers == "all":
        steps = last
    elif gpu_layers == "auto":
        steps = last
        if device_free is not None:
            steps = next(
                (
                    k
                    for k in range(last, 0, -1)
                    if _on_device(shape, backend, k, cells, cache_type) <= device_free
                ),
                0,
            )
    else:
        steps = min(int(gpu_layers), last)
    device_bytes, host_bytes, host_weights = split(shape, backend, steps, cells, cache_type)
    return MemoryPlan(
        backend=backend,
        device=device,
        slots=slots,
        ctx=per_seq,
        n_layers=shape.n_layers,
        gpu_layers=steps,
        weights_bytes=shape.weights_bytes,
        kv_bytes=kv_bytes(shape, cells, cache_type=cache_type),
        compute_bytes=compute_bytes(shape, cells),
        device_bytes=device_bytes,
        host_bytes=host_bytes,
        host_weights_bytes=host_weights,
    )


def _mb(n: int) -> int:
    return -(-n // MB)


def check_fits(
    plan: MemoryPlan, ram_free: int, device_free: int | None, model: str = "", ram_headroom: float = 1.0
) -> None:
    """Refuse a plan that does not fit: `INSUFFICIENT_VRAM` for the accelerator, else `INSUFFICIENT_RAM`.

    Metal shares one pool between GPU and host, so both halves count against it. The
    weights kept on the host count `ram_headroom` times (the hive's `--ram-factor`,
    1.2: "model size × 1.2"): the runtime and the worker's Python want room beside them.
    """
    breakdown = {
        "weights_bytes": plan.weights_bytes,
        "kv_bytes": plan.kv_bytes,
        "compute_bytes": plan.compute_bytes,
        "slots": plan.slots,
        "ctx": plan.ctx,
        "gpu_layers": plan.gpu_layers,
        "model": model,
    }
    what = f"{plan.slots} slot(s) × ctx {plan.ctx}"
    if plan.backend == SPLIT and device_free is not None and plan.device_bytes > device_free:
        raise RbeeError(
            ErrorCode.INSUFFICIENT_RAM,
            f"insufficient memory on the split's RPC servers: {plan.gpu_layers}/{plan.n_layers + 1} "
            f"layers need {_mb(plan.device_bytes)} MB ({what}), the servers have {device_free // MB} MB free",
            status=507,
            details={**breakdown, "required_bytes": plan.device_bytes, "available_bytes": device_free},
            hint="more helper nodes in --split, fewer --gpu-layers, or a smaller quantization",
        )
    if plan.backend not in ("cpu", SPLIT) and device_free is not None:
        need = plan.total_bytes if plan.backend == "metal" else plan.device_bytes
        if plan.gpu_layers == 0 or need > device_free:
            where = f"{plan.backend}:{plan.device if plan.device is not None else 0}"
            raise RbeeError(
                ErrorCode.INSUFFICIENT_VRAM,
                f"insufficient VRAM on {where}: need {_mb(need)} MB "
                f"({plan.gpu_layers}/{plan.n_layers + 1} layers, {what}), have {_mb(device_free)} MB free",
                status=507,
                details={
                    **breakdown,
                    "backend": plan.backend,
                    "device": plan.device,
                    "required_bytes": need,
                    "available_bytes": device_free,
                    "required_vram_mb": _mb(need),
                    "available_vram_mb": device_free // MB,
                },
                hint="fewer --slots or a smaller --ctx-size, --gpu-layers N for a partial offload, "
                "a smaller quantization, or --backend cpu",
            )
        if plan.backend == "metal":
            return
    need = plan.host_bytes + int(plan.host_weights_bytes * (ram_headroom - 1))
    if need > ram_free:
        if plan.backend == "cpu":
            parts = (
                f"weights {_mb(plan.weights_bytes)} MB + KV cache {_mb(plan.kv_bytes)} MB for {what} "
                f"+ compute {_mb(plan.compute_bytes)} MB"
            )
        else:
            parts = f"what {plan.gpu_layers}/{plan.n_layers + 1} offloaded layers leave on the host, {what}"
        if ram_headroom != 1.0:
            parts += f", weights × {ram_headroom:g}"
        raise RbeeError(
            ErrorCode.INSUFFICIENT_RAM,
            f"insufficient RAM: need {_mb(need)} MB ({parts}), have {ram_free // MB} MB free",
            status=507,
            details={
                **breakdown,
                "ram_factor": ram_headroom,
                "required_bytes": need,
                "available_bytes": ram_free,
                "required_mb": _mb(need),
                "available_mb": ram_free // MB,
            },
            hint="fewer --slots or a smaller --ctx-size, a smaller quantization, "
            "or stop other workers (rbee-hive worker list / stop)",
        )
