"""The per-token FP8 quantization kernel against the PyTorch reference, bit for bit.

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (tests/triton_interpreter.py); on a GPU
in-process. The kernel rounds in float32 arithmetic before its cast (`quantize_e4m3`), so even the
interpreter, whose own float32 -> e4m3 cast rounds ties away from zero and drops the carry into the next
binade, stores the reference's bytes. Rows read once and rows too long for that (read twice), ragged widths, a zero row, bf16 and
float32 inputs, and the custom op under torch.compile's fake tensors.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from triton_interpreter import WORKER_FLAG, interpreter_results

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)

# (rows, features, dtype[, block_k, num_warps]): by default one pass up to 16384 features, two passes above; the
# tiles a sweep may pick (`QuantTiles`): two passes over small blocks with a ragged last one, other warp counts
CASES = {"one_pass_ragged_bf16": (3, 100, "bfloat16"), "one_pass_fp32": (2, 64, "float32"),
         "two_pass_bf16": (2, 16384 + 300, "bfloat16"), "two_pass_small_blocks": (3, 300, "bfloat16", 64, 1),
         "one_pass_more_warps": (2, 100, "bfloat16", None, 8)}


def run_case(rows: int, features: int, dtype_name: str, block_k: int | None = None, num_warps: int | None = None,
             *, device: str) -> dict[str, int]:
    from pagedserve.engine.kernels.fp8_quant import QuantTiles, quantize_rows, quantize_rows_triton

    generator = torch.Generator().manual_seed(rows * 7 + features)
    x = (torch.randn(rows, features, generator=generator) * 3).to(device, getattr(torch, dtype_name))
    x[-1] = 0  # a row of zeros keeps the floor scale and quantizes to zeros
    want_q, want_scale = quantize_rows(x)
    tiles = None if block_k is None and num_warps is None else QuantTiles(block_k, num_warps)
    got_q, got_scale = quantize_rows_triton(x, tiles)
    return {"values_differing": int((got_q.view(torch.uint8) != want_q.view(torch.uint8)).sum()),
            "values": got_q.numel(),
            "scales_differing": int((got_scale != want_scale).sum()),
            "scale_shape_ok": int(got_scale.shape == (rows, 1))}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return interpreter_results(__file__)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_the_reference_bit_for_bit_in_the_interpreter(interpreted: dict, case: str) -> None:
    result = interpreted[case]
    assert result["values_differing"] == 0 and result["scales_differing"] == 0 and result["scale_shape_ok"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
@pytest.mark.parametrize("case", sorted(CASES) + ["many_rows"])
def test_kernel_matches_the_reference_bit_for_bit_on_the_gpu(case: str) -> None:
    result = run_case(*CASES.get(case, (2048, 14336, "bfloat16")), device="cuda")
    assert result["values_differing"] == 0 and result["scales_differing"] == 0 and result["scale_shape_ok"] == 1


def test_the_op_falls_back_to_the_reference_on_cpu_and_traces_under_compile() -> None:
    from pagedserve.engine.kernels.fp8_quant import FP8_DTYPE, quantize_rows, quantize_rows_fp8

    x = torch.randn(4, 32)
    got, want = quantize_rows_fp8(x), quantize_rows(x)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
    compiled = torch.compile(lambda t: quantize_rows_fp8(t)[0].float() * quantize_rows_fp8(t)[1], backend="eager",
                             fullgraph=True)
    assert torch.equal(compiled(x), want[0].float() * want[1]) and want[0].dtype == FP8_DTYPE


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    import json

    print(json.dumps({name: run_case(*case, device="cpu") for name, case in CASES.items()}))
