"""SiLU(gate) * up quantized per row in one kernel (engine/kernels/silu_mul_fp8.py) against the unfused path,
bit for bit.

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (tests/triton_interpreter.py). The interpreter
has no libdevice: its exp is numpy's, which differs from torch's CPU exp in the last bit for some inputs, so its
reference is the same formula with numpy's exp (`_interpreter_reference`); everything after the exp (the rounding
to the activation dtype, the product, the row's scale, the e4m3 cast) must match bit for bit. Widths read once
and twice (over 16,384 features, and small blocks), ragged widths, rows of zeros and of large magnitudes, gate
and up as strided views of one [M, 2K] tensor (what projection fusion hands over), bfloat16, float16 and float32,
both numerics (eager PyTorch's and Inductor's), and every 16-bit gate value. On a GPU (tests with `gpu` in their
names): the kernel against eager PyTorch's and torch.compile's own kernels for every gate value, and the fused
quantization against the unfused chain at Llama-3-8B's MLP shape.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from triton_interpreter import WORKER_FLAG, interpreter_results

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# name: (rows, features, dtype, inductor numerics, block_k (None: the default tiles, `default_quant_tiles`: one pass
# up to 8,192 features, two above), how the values are made)
CASES = {
    "one_pass_ragged_bf16": (4, 100, "bfloat16", False, None, "randn"),
    "one_pass_fp16": (3, 96, "float16", False, None, "randn"),
    "one_pass_fp32": (2, 64, "float32", False, None, "randn"),
    "two_pass_bf16": (2, 16384 + 300, "bfloat16", False, None, "randn"),
    "two_pass_default_8b_width_bf16": (2, 14336, "bfloat16", False, None, "randn"),
    "two_pass_small_blocks_bf16": (3, 300, "bfloat16", False, 64, "randn"),
    "inductor_bf16": (4, 100, "bfloat16", True, None, "randn"),
    "inductor_two_pass_fp16": (3, 300, "float16", True, 64, "randn"),
    "strided_views_bf16": (4, 96, "bfloat16", False, None, "views"),
    "large_and_small_bf16": (4, 200, "bfloat16", False, None, "magnitudes"),
    "large_and_small_fp16": (4, 200, "float16", False, None, "magnitudes"),
    "every_gate_value_bf16": (256, 256, "bfloat16", False, None, "every"),
    "every_gate_value_fp16": (256, 256, "float16", False, None, "every"),
    "every_gate_value_inductor_bf16": (256, 256, "bfloat16", True, None, "every"),
}


def make_inputs(rows: int, features: int, dtype: torch.dtype, how: str,
                device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up [rows, features]; the last row's gate is zeros unless every gate value is asked for."""
    generator = torch.Generator().manual_seed(rows * 7 + features)
    if how == "every":  # all 65,536 bit patterns of the dtype, the non-finite ones as 0
        gate = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(rows, features)
        gate = torch.where(gate.isfinite(), gate, torch.zeros_like(gate))
        # |up| <= 1 keeps every product finite (a row holding an infinity quantizes to NaNs, not compared here)
        up = (torch.rand(rows, features, generator=generator) * 2 - 1).to(dtype)
        return gate.to(device), up.to(device)
    if how == "views":  # gate and up as the halves of one fused GEMM's output rows (row stride 2 * features)
        fused = (torch.randn(rows, 2 * features, generator=generator) * 3).to(dtype)
        fused[-1, :features] = 0
        fused = fused.to(device)
        return fused[:, :features], fused[:, features:]
    gate = (torch.randn(rows, features, generator=generator) * 3).to(dtype)
    up = (torch.randn(rows, features, generator=generator) * 3).to(dtype)
    if how == "magnitudes":  # rows far apart: far beyond e4m3's range (float16's products kept finite), tiny values
        big = 10.0 if dtype == torch.float16 else 1e4
        gate[0] *= big
        up[0] *= big
        gate[1] *= 1e-3
        up[1] *= 1e-3
        gate[2, 0] = -big  # a large negative gate: exp(-g) overflows to inf, SiLU is -0
    gate[-1] = 0
    return gate.to(device), up.to(device)


def _interpreter_reference(gate: torch.Tensor, up: torch.Tensor, inductor: bool) -> torch.Tensor:
    """SiLU(gate) * up as the kernel computes it in the interpreter (exp from numpy), in gate's dtype."""
    import numpy as np

    g = gate.float().numpy()
    u = up.float().numpy()
    with np.errstate(over="ignore"):
        e = np.exp(-g)
    if inductor:  # float32 throughout, one rounding at the end
        return torch.from_numpy(g / (e + np.float32(1)) * u).to(gate.dtype)
    act = torch.from_numpy(g / (np.float32(1) + e)).to(gate.dtype)
    return act * up


def run_case(rows: int, features: int, dtype_name: str, inductor: bool, block_k: int | None, how: str,
             *, device: str) -> dict[str, int]:
    from pagedserve.engine.kernels.fp8_quant import MAX_ONE_PASS_K, QuantTiles, quantize_rows
    from pagedserve.engine.kernels.silu_mul_fp8 import silu_mul_quantize_triton, silu_mul_triton

    dtype = DTYPES[dtype_name]
    gate, up = make_inputs(rows, features, dtype, how, device)
    values = _interpreter_reference(gate, up, inductor)
    want_q, want_scale = quantize_rows(values)
    result: dict[str, int] = {}
    got_q, got_scale = silu_mul_quantize_triton(gate, up, inductor, None if block_k is None else QuantTiles(block_k))
    if how == "randn" and features <= MAX_ONE_PASS_K:  # and read once, whatever the default tiles are
        one_pass_q, one_pass_scale = silu_mul_quantize_triton(gate, up, inductor, QuantTiles())
        result["one_pass_differing"] = int((one_pass_q.view(torch.uint8) != want_q.view(torch.uint8)).sum()
                                           + (one_pass_scale != want_scale).sum())
    result.update({"values_differing": int((got_q.view(torch.uint8) != want_q.view(torch.uint8)).sum()),
                   "scales_differing": int((got_scale != want_scale).sum()),
                   "zero_row_ok": int(bool((got_q[-1].float() == 0).all()) or how == "every")})
    if how != "views":
        got_values = silu_mul_triton(gate.contiguous(), up.contiguous(), inductor)
        result["products_differing"] = int((got_values.view(torch.uint8) != values.view(torch.uint8)).sum())
    return result


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return interpreter_results(__file__)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_the_reference_bit_for_bit_in_the_interpreter(interpreted: dict, case: str) -> None:
    result = interpreted[case]
    assert result == {**result, "values_differing": 0, "scales_differing": 0, "zero_row_ok": 1}
    assert result.get("products_differing", 0) == 0 and result.get("one_pass_differing", 0) == 0


def test_the_op_runs_the_unfused_reference_on_cpu_and_traces_under_compile() -> None:
    from pagedserve.engine.kernels.fp8_quant import FP8_DTYPE
    from pagedserve.engine.kernels.fp8_quant import quantize_rows_fp8
    from pagedserve.engine.kernels.silu_mul_fp8 import silu_mul_quantize_fp8

    fused = (torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    gate, up = fused[:, :32], fused[:, 32:]
    want = quantize_rows_fp8(torch.nn.functional.silu(gate) * up)  # the unfused path, as an FP8 MLP runs it
    got = silu_mul_quantize_fp8(gate, up, False)
    assert got[0].dtype == FP8_DTYPE and got[1].shape == (5, 1)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])

    def dequantized(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        q, scale = silu_mul_quantize_fp8(g, u, False)
        return q.float() * scale

    compiled = torch.compile(dequantized, backend="eager", fullgraph=True)
    assert torch.equal(compiled(gate, up), want[0].float() * want[1])


def test_mismatched_operands_are_refused() -> None:
    from pagedserve.engine.kernels.silu_mul_fp8 import silu_mul_quantize_triton

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul_quantize_triton(torch.zeros(2, 8), torch.zeros(2, 9))
    with pytest.raises(ValueError, match="not supported"):
        silu_mul_quantize_triton(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or newer GPU (compute capability 9.0+)")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_gpu_kernel_products_match_eager_and_inductor_for_every_gate_value(dtype_name: str) -> None:
    """The product before quantization, value by value: eager numerics against `F.silu(gate) * up` (PyTorch's
    CUDA kernels), Inductor numerics against torch.compile's kernel of the same expression."""
    from pagedserve.engine.kernels.fp8_mlp import inductor_matches_kernel
    from pagedserve.engine.kernels.silu_mul_fp8 import silu_mul_reference, silu_mul_triton

    dtype = DTYPES[dtype_name]
    gate, up = make_inputs(256, 256, dtype, "every", "cuda")
    eager = silu_mul_reference(gate, up)
    got = silu_mul_triton(gate, up, inductor=False)
    assert int((got.view(torch.int16) != eager.view(torch.int16)).sum()) == 0
    compiled = torch.compile(silu_mul_reference, backend="inductor", dynamic=False)(gate, up)
    got = silu_mul_triton(gate, up, inductor=True)
    assert int((got.view(torch.int16) != compiled.view(torch.int16)).sum()) == 0
    assert inductor_matches_kernel(torch.device("cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or newer GPU (compute capability 9.0+)")
@pytest.mark.parametrize("features", [14336, 28672])  # Llama-3-8B's MLP, 70B's
def test_gpu_fused_mlp_quantization_equals_the_unfused_chain(features: int) -> None:
    """2,048 rows of gate and up as views of one GEMM output: the fused e4m3 rows and scales are the unfused
    chain's (SiLU * up eagerly or compiled, then `quantize_rows_fp8`), and so is the down projection's output."""
    from pagedserve.engine.kernels.fp8_linear import fp8_gemm, quantize_weight
    from pagedserve.engine.kernels.fp8_quant import MAX_ONE_PASS_K, QuantTiles, quantize_rows_fp8
    from pagedserve.engine.kernels.silu_mul_fp8 import (
        silu_mul_quantize_fp8,
        silu_mul_quantize_triton,
        silu_mul_reference,
    )

    rows = 2048 if features == 14336 else 256
    gate, up = make_inputs(rows, features, torch.bfloat16, "views", "cuda")
    weight, weight_scale = quantize_weight(torch.randn(4096, features, device="cuda", dtype=torch.bfloat16))
    compiled = torch.compile(silu_mul_reference, backend="inductor", dynamic=False)
    for inductor, product in ((False, silu_mul_reference), (True, compiled)):
        want_q, want_scale = quantize_rows_fp8(product(gate, up))
        got_q, got_scale = silu_mul_quantize_fp8(gate, up, inductor)
        assert int((got_q.view(torch.uint8) != want_q.view(torch.uint8)).sum()) == 0, inductor
        assert torch.equal(got_scale, want_scale), inductor
        if features <= MAX_ONE_PASS_K:  # the tiles the benchmark also times
            one_pass_q, one_pass_scale = silu_mul_quantize_triton(gate, up, inductor, QuantTiles())
            assert torch.equal(one_pass_q.view(torch.uint8), want_q.view(torch.uint8))
            assert torch.equal(one_pass_scale, want_scale)
        want = fp8_gemm(want_q, want_scale, weight, weight_scale, None, torch.bfloat16, use_scaled_mm=True)
        got = fp8_gemm(got_q, got_scale, weight, weight_scale, None, torch.bfloat16, use_scaled_mm=True)
        assert torch.equal(got, want), inductor


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    import json

    print(json.dumps({name: run_case(*case, device="cpu") for name, case in CASES.items()}))
