"""Decode-size linear layers: the skinny Triton GEMM (engine/kernels/decode_linear.py) against cuBLAS, and the
greedy argmax over the vocabulary.

Llama-3-8B's projections (q/k/v and gate/up fused as the engine runs them, o, down, LM head) at 1-16
tokens, bf16. Each timing replays a CUDA graph (as the engine's decode steps do) of one call per copy
of the weight, with enough copies to exceed 4x the L2 cache, so every call reads its weight from
memory; reported as the weight's GB/s. `--sweep` times every candidate tile config and prints the best
per shape; without it only the default config. `--fp8`: the weights in e4m3 with a scale per output
feature (engine/kernels/fp8_linear.py), the kernel reading FP8 and the library column timing the FP8
layer's own GEMM (per-token activation scaling and `torch._scaled_mm`); bf16 cuBLAS is printed beside.
Usage: python bench/linear_bench.py [--sweep] [--fp8]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.testing

from pagedserve.engine.kernels.decode_linear import SkinnyConfig, default_config, skinny_linear
from pagedserve.engine.kernels.fp8_linear import fp8_linear, quantize_weight
from pagedserve.engine.core import sampler
from pagedserve.engine.core.sampler import greedy_argmax

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096),
          # Qwen3-30B-A3B's attention (32 query heads and 4 KV heads of 128 over hidden 2048) and LM head: the
          # small weights of a MoE model's one-row step (issue 30), not in the default list
          "moe_qkv": (5120, 2048), "moe_o": (2048, 4096), "moe_lm_head": (151936, 2048)}
DEFAULT_SHAPES = ("qkv", "o", "gate_up", "down", "lm_head")
DTYPE = torch.bfloat16


def graph_time_us(fn, calls: int, replays: int = 20) -> float:
    """Mean time of one of `calls` calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / calls


def copy_bandwidth_gbs() -> float:
    """Read + write bandwidth of a 512 MiB device copy, timed eagerly: captured in a graph the copy
    becomes a memcpy node, which ran well below the eager copy's rate on an H200."""
    src = torch.randn(1 << 28, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def candidates(fp8: bool = False) -> list[SkinnyConfig]:
    """Tiles to time; with `fp8`, also the multiply-and-sum tiles with float16 products (FP8 weights only)."""
    dot = [SkinnyConfig(bn, bk, w, s) for bn, bk, (w, s) in
           itertools.product((16, 32, 64), (128, 256, 512, 1024), ((4, 3), (4, 5), (8, 4)))]
    fma = [SkinnyConfig(bn, bk, w, s, use_dot=False) for bn, bk, (w, s) in
           itertools.product((8, 16, 32), (256, 512, 1024, 2048, 4096), ((4, 3), (8, 4)))]
    f16 = [SkinnyConfig(bn, bk, w, s, use_dot=False, f16_products=True) for bn, bk, (w, s) in
           itertools.product((8, 16), (1024, 2048, 4096), ((4, 3), (8, 4)))] if fp8 else []
    return dot + fma + f16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--fp8", action="store_true", help="FP8 weights (e4m3, a scale per output feature)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES),
                        help="Llama-3-8B's projections by default; moe_* are Qwen3-30B-A3B's attention and LM head")
    args = parser.parse_args()
    torch.manual_seed(0)
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    print(f"{torch.cuda.get_device_name(0)}; copy bandwidth {copy_bandwidth_gbs():.0f} GB/s; L2 {l2_bytes >> 20} MiB")
    table = []
    for name in args.shapes:
        n, k = SHAPES[name]
        weight_bytes = n * k * (1 if args.fp8 else 2)
        copies = max(2, -(-4 * l2_bytes // weight_bytes))
        weights = [torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.02 for _ in range(copies)]
        scales = [None] * copies
        if args.fp8:
            bf16_weights = weights[:max(2, -(-4 * l2_bytes // (n * k * 2)))]
            quantized = [quantize_weight(w) for w in weights]
            weights, scales = [w for w, _ in quantized], [s for _, s in quantized]
        for m in args.rows:
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            if args.fp8:
                ref = F.linear(x.float(), weights[0].float() * scales[0][:, None])
                bf16_us = graph_time_us(lambda: [F.linear(x, w) for w in bf16_weights], len(bf16_weights))
                try:
                    cublas_us = graph_time_us(
                        lambda: [fp8_linear(x, w, s, None, True) for w, s in zip(weights, scales)], copies)
                except RuntimeError as error:  # a row count _scaled_mm refuses
                    print(f"{name} m={m}: FP8 GEMM failed: {error}", flush=True)
                    cublas_us = float("nan")
                print(f"{name} m={m}: bf16 cuBLAS {bf16_us:.1f} us ({n * k * 2 / bf16_us / 1e3:.0f} GB/s)", flush=True)
            else:
                ref = F.linear(x.float(), weights[0].float())
                cublas_us = graph_time_us(lambda: [F.linear(x, w) for w in weights], copies)
            default = default_config(n, m, torch.cuda.get_device_properties(0).multi_processor_count, args.fp8)
            configs = candidates(args.fp8) if args.sweep else [default]
            results = []
            for config in configs:
                if not config.use_dot and m > 1:
                    continue
                try:
                    out = skinny_linear(x, weights[0], None, config, weight_scale=scales[0])
                except triton.runtime.errors.OutOfResources:
                    continue  # too many stages of too large tiles for shared memory
                error = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if error > 2e-2:
                    raise AssertionError(f"{name} m={m} {config}: relative error {error:.3g}")
                us = graph_time_us(lambda: [skinny_linear(x, w, None, config, weight_scale=s)
                                            for w, s in zip(weights, scales)], copies)
                results.append((us, config))
            results.sort(key=lambda r: r[0])
            best_us, best = results[0]
            default_us = next((us for us, c in results if c == default), float("nan"))
            table.append((name, m, cublas_us, default_us, best_us, best, weight_bytes))
            print(f"{name} m={m}: cuBLAS {cublas_us:.1f} us, default {default_us:.1f}, best {best_us:.1f} {best}",
                  flush=True)
            if args.sweep:
                print("   top 5: " + "; ".join(f"{us:.1f} {c}" for us, c in results[:5]), flush=True)
        del weights, scales
        torch.cuda.empty_cache()

    vocab = 128256
    argmax_rows = []
    sampler._TWO_STAGE_MAX_ROWS = 1 << 30  # time the two stages at every row count
    for rows in (1, 4, 16, 64, 256, 512):
        logits = torch.randn(rows, vocab, device="cuda")
        assert torch.equal(greedy_argmax(logits), logits.argmax(dim=1))
        argmax_rows.append((rows, graph_time_us(lambda: logits.argmax(dim=1), 1),
                            graph_time_us(lambda: greedy_argmax(logits), 1)))

    library = "FP8 GEMM (_scaled_mm)" if args.fp8 else "cuBLAS"
    print(f"\n{'FP8 weights' if args.fp8 else 'bf16 weights'}; the library column: {library}")
    print("\n| projection | rows | cuBLAS us | skinny (default) us | best us | cuBLAS GB/s | default GB/s | best config |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, m, cublas_us, default_us, best_us, best, weight_bytes in table:
        print(f"| {name} | {m} | {cublas_us:.1f} | {default_us:.1f} | {best_us:.1f} | {weight_bytes / cublas_us / 1e3:.0f} | "
              f"{weight_bytes / default_us / 1e3:.0f} | {best.block_n}x{best.block_k} w{best.num_warps} s{best.num_stages}"
              f"{'' if best.use_dot else ' f16' if best.f16_products else ' fma'} |")
    print("\n| rows | argmax us | greedy_argmax us |")
    print("|---:|---:|---:|")
    for rows, plain_us, two_stage_us in argmax_rows:
        print(f"| {rows} | {plain_us:.1f} | {two_stage_us:.1f} |")


if __name__ == "__main__":
    main()
