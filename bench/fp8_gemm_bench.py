"""FP8 against bf16 GEMMs at prefill and batched-decode sizes: where the FP8 layer's time goes.

Llama-3-8B's projections as the engine runs them (q/k/v and gate/up fused, o, down) at M tokens. Per
shape and M: bf16 `F.linear`; the FP8 layer (per-token activation quantization by the Triton kernel of
engine/kernels/fp8_quant.py, then `torch._scaled_mm` with row-wise scales: engine/kernels/fp8_linear.py);
the quantization alone, by that kernel and by the PyTorch reference (eager); `_scaled_mm` alone on
already quantized input, with its default accumulation and with `use_fast_accum` (FAST_ACCUMULATION there).
Times are CUDA-event medians (triton.testing.do_bench, so launch overhead shows at small M; the engine
replays decode steps as CUDA graphs); TFLOP/s counts 2*M*N*K.

    python bench/fp8_gemm_bench.py --rows 16 64 256 512 2048 8192
    python bench/fp8_gemm_bench.py --rows 2048 8192 --quant-sweep    # the quantization kernel's tiles

`--quant-sweep` times `quantize_rows_triton` over its `QuantTiles` (one pass with 2-32 warps; two passes over
blocks of 1,024-8,192 features with 2-16 warps) at the projections' input widths (4,096 and 14,336) and prints the
fastest per width and row count against the default (`default_quant_tiles`), with the bytes it moves a second
(a read of 2 bytes and a write of 1 per element).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing

from pagedserve.engine.kernels.fp8_linear import fp8_linear, quantize_rows, quantize_weight
from pagedserve.engine.kernels.fp8_quant import MAX_ONE_PASS_K, QuantTiles, default_quant_tiles, quantize_rows_triton

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def time_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median") * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 512, 2048, 8192])
    parser.add_argument("--quant-sweep", action="store_true", help="only the quantization kernel's tiles (above)")
    args = parser.parse_args()
    if args.quant_sweep:
        quant_sweep(args.rows)
        return
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| projection | M | bf16 us | fp8 layer us | quantize (Triton) us | quantize (eager) us | _scaled_mm us | "
          "_scaled_mm fast accum us | bf16 TFLOP/s | fp8 layer TFLOP/s | fp8 / bf16 speed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        weight_q, weight_scale = quantize_weight(weight)
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            x_q, x_scale = quantize_rows(x)
            bf16_us = time_us(lambda: F.linear(x, weight))
            layer_us = time_us(lambda: fp8_linear(x, weight_q, weight_scale, None, True))
            triton_us = time_us(lambda: quantize_rows_triton(x))
            eager_us = time_us(lambda: quantize_rows(x))
            mm_us, fast_us = (time_us(lambda: torch._scaled_mm(x_q, weight_q.T, scale_a=x_scale,
                                                               scale_b=weight_scale[None, :],
                                                               out_dtype=torch.bfloat16, use_fast_accum=fast))
                              for fast in (False, True))
            flop = 2 * m * n * k
            print(f"| {name} | {m} | {bf16_us:.1f} | {layer_us:.1f} | {triton_us:.1f} | {eager_us:.1f} | "
                  f"{mm_us:.1f} | {fast_us:.1f} | {flop / bf16_us / 1e6:.0f} | {flop / layer_us / 1e6:.0f} | "
                  f"{bf16_us / layer_us:.2f}x |", flush=True)


def quant_tile_grid(num_features: int) -> list[QuantTiles]:
    one_pass = [QuantTiles(None, warps) for warps in (2, 4, 8, 16, 32)] if num_features <= MAX_ONE_PASS_K else []
    return one_pass + [QuantTiles(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (2, 4, 8, 16)
                       if block < num_features and warps * 32 <= block]


def quant_sweep(rows: list[int]) -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}: quantization tiles")
    print("| features | M | default us | default TB/s | best tiles | best us | best TB/s |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    for num_features in sorted({k for _, k in SHAPES.values()}):
        for m in rows:
            x = torch.randn(m, num_features, dtype=torch.bfloat16, device="cuda")
            moved = 3 * m * num_features  # bytes: bf16 in, e4m3 out

            def rate(us: float) -> float:
                return moved / us / 1e6

            default_us = time_us(lambda: quantize_rows_triton(x, default_quant_tiles(num_features)))
            timed = [(time_us(lambda tiles=tiles: quantize_rows_triton(x, tiles)), tiles)
                     for tiles in quant_tile_grid(num_features)]
            best_us, best = min(timed, key=lambda pair: pair[0])
            print(f"| {num_features} | {m} | {default_us:.1f} | {rate(default_us):.2f} | "
                  f"block_k={best.block_k}, num_warps={best.num_warps} | {best_us:.1f} | {rate(best_us):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
