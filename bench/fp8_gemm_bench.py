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
    python bench/fp8_gemm_bench.py --rows 512 2048 8192 --mlp-fusion  # SiLU * up + quantization fused

`--quant-sweep` times `quantize_rows_triton` over its `QuantTiles` (one pass with 2-32 warps; two passes over
blocks of 1,024-8,192 features with 2-16 warps) at the projections' input widths (4,096 and 14,336) and prints the
fastest per width and row count against the default (`default_quant_tiles`), with the bytes it moves a second
(a read of 2 bytes and a write of 1 per element).

`--mlp-fusion` times Llama-3-8B's MLP after its gate/up GEMM (gate and up as the halves of its [M, 28,672]
output, as projection fusion hands them over) up to the down projection's output, both ways the FP8 MLP can run
(engine/kernels/fp8_mlp.py): unfused, SiLU * up (eager PyTorch, and torch.compile's kernel, as a compiled
decoder layer runs it), `quantize_rows_fp8`, `_scaled_mm`; fused, `silu_mul_quantize_fp8` (with the same numerics)
and `_scaled_mm`. Also each piece alone (the fused kernel with its default tiles, the quantization kernel's, and
reading each row once), the fused chain's gain in us and as a share of the unfused chain, and whether the fused
e4m3 rows, scales and down output are the unfused chain's bits.
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
    parser.add_argument("--mlp-fusion", action="store_true", help="only the fused MLP quantization (above)")
    args = parser.parse_args()
    if args.quant_sweep:
        quant_sweep(args.rows)
        return
    if args.mlp_fusion:
        mlp_fusion(args.rows)
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


def mlp_fusion(rows: list[int]) -> None:
    from pagedserve.engine.kernels.fp8_linear import fp8_gemm
    from pagedserve.engine.kernels.fp8_quant import quantize_rows_fp8
    from pagedserve.engine.kernels.silu_mul_fp8 import (
        silu_mul_quantize_fp8,
        silu_mul_quantize_triton,
        silu_mul_reference,
    )

    torch.manual_seed(0)
    hidden, intermediate = SHAPES["down"]
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}: Llama-3-8B's MLP from gate/up to the down "
          f"projection's output ({intermediate} -> {hidden} features)")
    weight = torch.randn(hidden, intermediate, dtype=torch.bfloat16, device="cuda") * 0.02
    weight_q, weight_scale = quantize_weight(weight)
    compiled = torch.compile(silu_mul_reference, dynamic=False)
    print("| M | numerics | SiLU*up us | quantize us | fused kernel us | fused kernel, one pass us | _scaled_mm us | "
          "unfused chain us | fused chain us | gain us | gain % | equal bits |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in rows:
        gate_up = torch.randn(m, 2 * intermediate, dtype=torch.bfloat16, device="cuda") * 2
        gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
        x_q, x_scale = quantize_rows_fp8(silu_mul_reference(gate, up))
        product = silu_mul_reference(gate, up)
        down_us = time_us(lambda: fp8_gemm(x_q, x_scale, weight_q, weight_scale, None, torch.bfloat16, True))
        quantize_us = time_us(lambda: quantize_rows_fp8(product))
        for inductor, silu_mul in ((False, silu_mul_reference), (True, compiled)):

            def unfused() -> torch.Tensor:
                q, scale = quantize_rows_fp8(silu_mul(gate, up))
                return fp8_gemm(q, scale, weight_q, weight_scale, None, torch.bfloat16, True)

            def fused() -> torch.Tensor:
                q, scale = silu_mul_quantize_fp8(gate, up, inductor)
                return fp8_gemm(q, scale, weight_q, weight_scale, None, torch.bfloat16, True)

            want_q, want_scale = quantize_rows_fp8(silu_mul(gate, up))
            got_q, got_scale = silu_mul_quantize_fp8(gate, up, inductor)
            equal = (torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
                     and torch.equal(got_scale, want_scale) and torch.equal(fused(), unfused()))
            silu_us = time_us(lambda: silu_mul(gate, up))
            kernel_us = time_us(lambda: silu_mul_quantize_fp8(gate, up, inductor))
            one_pass_us = time_us(lambda: silu_mul_quantize_triton(gate, up, inductor, QuantTiles()))
            unfused_us, fused_us = time_us(unfused), time_us(fused)
            print(f"| {m} | {'compiled' if inductor else 'eager'} | {silu_us:.1f} | {quantize_us:.1f} | "
                  f"{kernel_us:.1f} | {one_pass_us:.1f} | {down_us:.1f} | {unfused_us:.1f} | {fused_us:.1f} | "
                  f"{unfused_us - fused_us:.1f} | {100 * (unfused_us - fused_us) / unfused_us:.1f} | "
                  f"{'yes' if equal else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
