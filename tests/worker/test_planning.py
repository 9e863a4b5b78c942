"""Memory planning on the GGUF metadata of real model shapes (pure arithmetic: no model is loaded).

The shapes below are those of published GGUF files — their metadata keys and
tensor list with types, as `gguf-dump` shows them — so the tensor byte counts
come out of the same quantization tables llama.cpp uses. KV sizes are checked
against the figures llama.cpp prints when it allocates the cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rbee_worker.gguf_header import TensorExtent
from rbee_worker.model_shape import ModelShape, read_model_shape, shape_from_header
from rbee_worker.planning import (
    check_fits,
    default_ctx,
    kv_bytes,
    kv_cells,
    parse_gpu_layers,
    plan_memory,
)
from rbee_worker.protocol.errors import RbeeError

MIB, GIB = 1 << 20, 1 << 30


def tensor(name: str, dims: tuple[int, ...], qtype: str) -> TensorExtent:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n = 1
    for d in dims:
        n *= d
    return TensorExtent(name, qtype, n, len(dims), 0, n // block * size)


def llama_like(
    arch: str,
    *,
    layers: int,
    embd: int,
    ff: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    ctx: int,
    quant: str = "Q4_K",
    big: str = "Q6_K",
    qkv_bias: bool = False,
) -> ModelShape:
    """A llama-family file as llama.cpp's Q4_K_M writes it: Q6_K for the output head, and for attn_v
    and ffn_down in the layers its `use_more_bits` picks (the first and last eighth, every third between).
    """
    head_dim = embd // heads
    tensors = [tensor("token_embd.weight", (embd, vocab), quant)]
    for i in range(layers):
        b = f"blk.{i}"
        more = i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2
        big_or_not = big if more else quant
        tensors += [
            tensor(f"{b}.attn_norm.weight", (embd,), "F32"),
            tensor(f"{b}.attn_q.weight", (embd, embd), quant),
            tensor(f"{b}.attn_k.weight", (embd, kv_heads * head_dim), quant),
            tensor(f"{b}.attn_v.weight", (embd, kv_heads * head_dim), big_or_not),
            tensor(f"{b}.attn_output.weight", (embd, embd), quant),
            tensor(f"{b}.ffn_norm.weight", (embd,), "F32"),
            tensor(f"{b}.ffn_gate.weight", (embd, ff), quant),
            tensor(f"{b}.ffn_up.weight", (embd, ff), quant),
            tensor(f"{b}.ffn_down.weight", (ff, embd), big_or_not),
        ]
        if qkv_bias:
            tensors += [tensor(f"{b}.attn_{x}.bias", (n,), "F32") for x, n in
                        (("q", embd), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim))]  # fmt: skip
    tensors += [tensor("output_norm.weight", (embd,), "F32"), tensor("output.weight", (embd, vocab), big)]
    fields = {
        "general.architecture": arch,
        f"{arch}.block_count": layers,
        f"{arch}.embedding_length": embd,
        f"{arch}.feed_forward_length": ff,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.context_length": ctx,
    }
    return shape_from_header(fields, tensors, {"tokenizer.ggml.tokens": vocab})


LLAMA3_8B = llama_like("llama", layers=32, embd=4096, ff=14336, heads=32, kv_heads=8, vocab=128256, ctx=8192)
LLAMA2_7B = llama_like("llama", layers=32, embd=4096, ff=11008, heads=32, kv_heads=32, vocab=32000, ctx=4096)
QWEN25_7B = llama_like(
    "qwen2", layers=28, embd=3584, ff=18944, heads=28, kv_heads=4, vocab=152064, ctx=32768, qkv_bias=True
)


def test_shapes_of_published_files() -> None:
    # published Q4_K_M files: Llama-3-8B-Instruct 4.92 GB, Llama-2-7B 4.08 GB, Qwen2.5-7B-Instruct 4.68 GB
    assert LLAMA3_8B.weights_bytes == pytest.approx(4.92e9, rel=0.02)
    assert LLAMA2_7B.weights_bytes == pytest.approx(4.08e9, rel=0.02)
    assert QWEN25_7B.weights_bytes == pytest.approx(4.68e9, rel=0.02)
    assert (LLAMA3_8B.n_head_kv, LLAMA3_8B.head_dim_k, LLAMA3_8B.kv_width) == (8, 128, 2048)
    assert (QWEN25_7B.n_layers, QWEN25_7B.n_head_kv, QWEN25_7B.head_dim_v) == (28, 4, 128)
    assert len(LLAMA3_8B.layer_bytes) == 32 and LLAMA3_8B.output_bytes > 0 and LLAMA3_8B.host_bytes > 0


def test_kv_cache_matches_what_llama_cpp_allocates() -> None:
    # llama.cpp: "KV self size = 1024.00 MiB, K (f16): 512.00 MiB, V (f16): 512.00 MiB" for Llama-3-8B at 8192
    assert kv_bytes(LLAMA3_8B, 8192) == 1024 * MIB
    assert kv_bytes(LLAMA2_7B, 4096) == 2048 * MIB  # no GQA: 4× the cache per token
    assert kv_bytes(QWEN25_7B, 4096) == 224 * MIB
    # slots × ctx is one cache of slots·ctx cells, padded to 256
    assert kv_cells(4, 4096) == 16384 and kv_cells(3, 1000) == 3072
    assert plan_memory(QWEN25_7B, backend="cpu", slots=4, ctx=4096).kv_bytes == 896 * MIB
    # --cache-type q8_0: "KV self size = 544.00 MiB, K (q8_0): 272.00 MiB, V (q8_0): 272.00 MiB"
    assert kv_bytes(LLAMA3_8B, 8192, cache_type="q8_0") == 544 * MIB
    assert kv_bytes(LLAMA3_8B, 8192, cache_type="q4_0") == 288 * MIB
    q8 = plan_memory(LLAMA3_8B, backend="cuda", ctx=8192, gpu_layers="all", cache_type="q8_0")
    assert (
        q8.kv_bytes == 544 * MIB
        and q8.device_bytes < plan_memory(LLAMA3_8B, backend="cuda", ctx=8192).device_bytes
    )


def test_default_context_is_capped() -> None:
    assert default_ctx(QWEN25_7B) == 4096  # trained for 32768: 3.5 GiB of KV nobody asked for
    assert default_ctx(LLAMA2_7B) == 4096
    assert plan_memory(QWEN25_7B, backend="cpu").ctx == 4096


def test_cpu_plan_is_weights_plus_kv_plus_compute() -> None:
    plan = plan_memory(LLAMA3_8B, backend="cpu", slots=2, ctx=4096)
    assert plan.device_bytes == 0 and plan.gpu_layers == 0
    assert plan.host_bytes == plan.weights_bytes + plan.kv_bytes + plan.compute_bytes
    assert plan.kv_bytes == 1024 * MIB
    # the compute buffer is what llama.cpp reserves for a 512-token batch: at least the f32 attention
    # scores of 32 heads against 8192 cells (without flash attention), and the logits of a 128k vocabulary
    assert plan.compute_bytes >= 32 * 512 * 8192 * 4 and plan.compute_bytes >= 4 * 512 * 128256


def test_auto_offloads_everything_that_fits_a_24_gb_card() -> None:
    plan = plan_memory(LLAMA3_8B, backend="cuda", device=0, ctx=8192, device_free=23892 * MIB)
    assert plan.gpu_layers == 33 and plan.full_offload
    assert (
        plan.device_bytes
        == LLAMA3_8B.weights_bytes - LLAMA3_8B.host_bytes + plan.kv_bytes + plan.compute_bytes
    )
    check_fits(plan, ram_free=8 * GIB, device_free=23892 * MIB)


def test_auto_offloads_as_many_layers_as_fit() -> None:
    free = 4 * GIB
    plan = plan_memory(LLAMA3_8B, backend="cuda", device=1, ctx=8192, device_free=free)
    assert 0 < plan.gpu_layers < 33 and plan.device_bytes <= free
    one_more = plan_memory(LLAMA3_8B, backend="cuda", ctx=8192, gpu_layers=plan.gpu_layers + 1)
    assert one_more.device_bytes > free
    # the rest stays on the host: weights and KV split by layer, nothing counted twice
    assert plan.device_bytes + plan.host_bytes > plan.weights_bytes + plan.kv_bytes
    check_fits(plan, ram_free=16 * GIB, device_free=free)


def test_a_card_too_small_for_one_layer_is_insufficient_vram() -> None:
    plan = plan_memory(LLAMA3_8B, backend="cuda", device=0, ctx=8192, device_free=200 * MIB)
    assert plan.gpu_layers == 0
    with pytest.raises(RbeeError) as caught:
        check_fits(plan, ram_free=64 * GIB, device_free=200 * MIB, model="llama3")
    err = caught.value
    assert err.code == "INSUFFICIENT_VRAM" and err.status == 507
    assert "on cuda:0" in err.message and "have 200 MB free" in err.message
    assert err.details["available_vram_mb"] == 200 and "--backend cpu" in (err.hint or "")


def test_all_layers_asked_for_but_not_fitting_is_refused() -> None:
    plan = plan_memory(QWEN25_7B, backend="cuda", device=0, gpu_layers="all", device_free=2 * GIB)
    assert plan.gpu_layers == 29
    with pytest.raises(RbeeError) as caught:
        check_fits(plan, ram_free=64 * GIB, device_free=2 * GIB)
    assert caught.value.code == "INSUFFICIENT_VRAM" and "29/29 layers" in caught.value.message


def test_metal_counts_both_halves_against_unified_memory() -> None:
    # one pool: offloading fewer layers does not make room, so it is all or nothing
    roomy = plan_memory(LLAMA3_8B, backend="metal", device=0, ctx=8192, device_free=8 * GIB)
    assert roomy.gpu_layers == 33 and roomy.total_bytes <= 8 * GIB
    check_fits(roomy, ram_free=8 * GIB, device_free=8 * GIB)
    tight = plan_memory(LLAMA3_8B, backend="metal", device=0, ctx=8192, device_free=6 * GIB)
    assert tight.gpu_layers == 0
    full = plan_memory(LLAMA3_8B, backend="metal", device=0, ctx=8192, gpu_layers="all")
    assert full.device_bytes < 6 * GIB < full.total_bytes  # the GPU half alone would fit
    with pytest.raises(RbeeError) as caught:
        check_fits(full, ram_free=64 * GIB, device_free=6 * GIB)
    assert caught.value.code == "INSUFFICIENT_VRAM" and "on metal:0" in caught.value.message


def test_insufficient_ram_names_need_and_free() -> None:
    plan = plan_memory(LLAMA3_8B, backend="cpu", slots=8, ctx=8192)
    with pytest.raises(RbeeError) as caught:
        check_fits(plan, ram_free=6 * GIB, device_free=None, ram_headroom=1.2)
    err = caught.value
    need = plan.host_bytes + int(plan.weights_bytes * 0.2)
    assert err.code == "INSUFFICIENT_RAM" and err.details["required_bytes"] == need
    assert f"need {-(-need // MIB)} MB" in err.message and "have 6144 MB free" in err.message
    assert "8 slot(s) × ctx 8192" in err.message and "KV cache 8192 MB" in err.message


def test_a_split_holds_a_model_bigger_than_its_worker_node() -> None:
    # Llama-3-8B Q4_K_M (4.9 GB) on a 3 GB worker node: whole, it is refused ...
    whole = plan_memory(LLAMA3_8B, backend="cpu", ctx=4096)
    with pytest.raises(RbeeError) as caught:
        check_fits(whole, ram_free=3 * GIB, device_free=None, ram_headroom=1.2)
    assert caught.value.code == "INSUFFICIENT_RAM"
    # ... split over two 4 GB helpers, every layer goes to them and the node keeps the token embedding
    split = plan_memory(LLAMA3_8B, backend="rpc", ctx=4096, device_free=8 * GIB)
    assert split.backend == "rpc" and split.gpu_layers == 33 and split.full_offload
    assert split.host_bytes == LLAMA3_8B.host_bytes < 3 * GIB
    assert split.device_bytes == split.weights_bytes - split.host_bytes + split.kv_bytes + split.compute_bytes
    check_fits(split, ram_free=3 * GIB, device_free=8 * GIB, ram_headroom=1.2)


def test_a_split_keeps_what_its_servers_cannot_hold() -> None:
    partial = plan_memory(LLAMA3_8B, backend="rpc", ctx=4096, device_free=3 * GIB)
    assert 0 < partial.gpu_layers < 33 and partial.device_bytes <= 3 * GIB
    check_fits(partial, ram_free=4 * GIB, device_free=3 * GIB)
    with pytest.raises(RbeeError) as caught:  # the layers left behind do not fit the node either
        check_fits(partial, ram_free=1 * GIB, device_free=3 * GIB)
    assert (
        caught.value.code == "INSUFFICIENT_RAM"
        and "offloaded layers leave on the host" in caught.value.message
    )
    forced = plan_memory(LLAMA3_8B, backend="rpc", ctx=4096, gpu_layers="all", device_free=3 * GIB)
    with pytest.raises(RbeeError) as caught:
        check_fits(forced, ram_free=64 * GIB, device_free=3 * GIB)
    err = caught.value
    assert err.code == "INSUFFICIENT_RAM" and "the split's RPC servers" in err.message
    assert "33/33 layers" in err.message and "have 3072 MB free" in err.message


def test_real_files_tiny_and_smollm2(tiny_model: Path, smollm2: Path) -> None:
    tiny = read_model_shape(tiny_model)
    assert (tiny.n_layers, tiny.n_head_kv, tiny.head_dim_k, tiny.context_length) == (2, 4, 16, 4096)
    assert tiny.weights_bytes <= tiny_model.stat().st_size
    smol = read_model_shape(smollm2)
    assert (smol.architecture, smol.n_layers, smol.n_embd, smol.n_head, smol.n_head_kv) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (smol.head_dim_k, smol.n_vocab, smol.context_length) == (64, 49152, 8192)
    assert smol.weights_bytes == pytest.approx(smollm2.stat().st_size, rel=0.03)
    plan = plan_memory(smol, backend="cpu", slots=4, ctx=1024)
    assert plan.kv_bytes == 90 * MIB  # llama.cpp: "KV self size = 90.00 MiB" for 4096 cells


def test_gpu_layers_parsing() -> None:
    assert parse_gpu_layers("auto") == "auto" and parse_gpu_layers("all") == "all"
    assert parse_gpu_layers("12") == 12 and parse_gpu_layers(0) == 0
    for bad in ("-1", "some", "1.5", "", True, -3):
        with pytest.raises(ValueError):
            parse_gpu_layers(bad)  # type: ignore[arg-type]
