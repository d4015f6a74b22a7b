"""The decode-size linear kernel against F.linear, and the layer swap that routes models through it.

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (the interpreter is chosen when the
kernel is defined); the interpreter's tl.dot mishandles bf16, so there bf16 goes through the
multiply-and-sum path and the tl.dot path is checked in float32/float16. GPU cases run in-process.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.kernels.decode_linear import DecodeFusedLead, DecodeLinear, decode_linear, use_decode_linear
from pagedserve.engine.kernels.fused_projections import FusedLead, ProjectionFusion
from triton_interpreter import WORKER_FLAG, interpreter_results

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

# (rows, out_features, in_features, dtype, bias, config as (block_n, block_k, warps, stages, use_dot[, f16_products]))
INTERPRETER_CASES = {
    "one_row_fp32_bias": (1, 64, 96, "float32", True, (16, 32, 4, 2, True)),
    "ragged_n_and_k": (3, 40, 70, "float32", False, (16, 32, 4, 2, True)),
    "sixteen_rows_fp16": (16, 48, 64, "float16", True, (16, 32, 4, 2, True)),
    "bf16_multiply_sum": (1, 40, 70, "bfloat16", True, (8, 32, 4, 2, False)),
    "two_rows_multiply_sum": (2, 24, 64, "float32", False, (8, 16, 4, 2, False)),
}


# The FP8-weight variant (an e4m3 weight and a scale per output feature, x unquantized), same fields.
FP8_INTERPRETER_CASES = {
    "fp8_one_row_fp32_bias": (1, 64, 96, "float32", True, (16, 32, 4, 2, True)),
    "fp8_ragged_multiply_sum": (1, 40, 70, "float32", False, (8, 32, 4, 2, False)),
    "fp8_fp16_dot": (1, 48, 64, "float16", True, (16, 32, 4, 2, True)),
    # float16 products, 8 summed in float16 (bf16 x, ragged K: a masked last step), then float32.
    "fp8_f16_products_bf16": (1, 40, 200, "bfloat16", True, (8, 64, 4, 2, False, True)),
    # x far past float16's range (x times 1e5): the per-step scaling keeps the products finite.
    "fp8_f16_products_large_x": (1, 24, 128, "float32", False, (8, 64, 4, 2, False, True)),
}


def run_case(rows, out_features, in_features, dtype_name, bias, config, device, use_pdl=False,
             fp8=False, x_scale: float = 1.0) -> dict[str, float]:
    from pagedserve.engine.kernels.decode_linear import SkinnyConfig, skinny_linear
    from pagedserve.engine.kernels.fp8_linear import quantize_weight

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = (torch.randn(rows, in_features, generator=generator) * x_scale).to(device, dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(device, dtype)
    b = torch.randn(out_features, generator=generator).to(device, dtype) if bias else None
    scale = None
    if fp8:
        weight, scale = quantize_weight(weight)
    out = skinny_linear(x, weight, b, SkinnyConfig(*config), use_pdl, weight_scale=scale)
    exact_weight = weight.float() if scale is None else weight.float() * scale[:, None]  # what the weight holds
    ref = F.linear(x.float(), exact_weight, None if b is None else b.float())
    return {
        "max_error": (out.float() - ref).abs().max().item() / ref.abs().max().item(),
        "shape_ok": float(out.shape == (rows, out_features) and out.dtype == dtype),
    }


def _interpreter_worker() -> None:
    results = {name: run_case(*case, device="cpu") for name, case in INTERPRETER_CASES.items()}
    results.update({name: run_case(*case, device="cpu", fp8=True, x_scale=1e5 if "large_x" in name else 1.0)
                    for name, case in FP8_INTERPRETER_CASES.items()})
    print(json.dumps(results))


@pytest.fixture(scope="module", name="interpreter_results")
def interpreter_results_fixture() -> dict[str, dict[str, float]]:
    """Every CPU case, run once in a subprocess under TRITON_INTERPRET=1."""
    return interpreter_results(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", [*INTERPRETER_CASES, *FP8_INTERPRETER_CASES])
def test_skinny_gemm_in_interpreter(name: str, interpreter_results: dict[str, dict[str, float]]) -> None:
    """bf16/fp16/fp32 weights, and FP8 weights read as FP8 (the `fp8_` cases)."""
    result = interpreter_results[name]
    assert result["shape_ok"] == 1.0
    case = {**INTERPRETER_CASES, **FP8_INTERPRETER_CASES}[name]
    f16_products = len(case[5]) > 5 and case[5][5]
    tolerance = 2e-2 if case[3] != "float32" else 2e-3 if f16_products else 1e-5  # float16 products: 11 bits
    assert result["max_error"] < tolerance, result


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_float16_products_only_over_an_fp8_weight_by_multiply_and_sum() -> None:
    from pagedserve.engine.kernels.decode_linear import SkinnyConfig, skinny_linear

    x, weight = torch.randn(1, 64), torch.randn(32, 64)
    for config in (SkinnyConfig(8, 64, 4, 2, use_dot=False, f16_products=True),  # a bf16/fp32 weight
                   SkinnyConfig(16, 64, 4, 2, use_dot=True, f16_products=True)):
        with pytest.raises(ValueError, match="f16_products"):
            skinny_linear(x, weight, None, config, weight_scale=None if not config.use_dot else torch.ones(32))


def test_default_config_narrow_tiles_only_for_one_row_over_a_short_weight() -> None:
    from pagedserve.engine.kernels.decode_linear import default_config, _fills_sms

    h200_sms = 132
    qkv = default_config(6144, 1, h200_sms)  # 96 programs of 64 features: under 0.75 per SM
    assert not qkv.use_dot and qkv.block_n == 8 and _fills_sms(6144, qkv, h200_sms)
    assert default_config(6144, 2, h200_sms).use_dot  # the multiply-and-sum tiles take one row only
    assert default_config(6144).use_dot  # no SM count (CPU callers): the wide tiles
    # One row over an FP8 weight: deep multiply-and-sum tiles for every projection, wider for long weights.
    fp8_qkv, fp8_gate_up = default_config(6144, 1, h200_sms, fp8_weight=True), default_config(28672, 1, fp8_weight=True)
    assert (fp8_qkv.use_dot, fp8_qkv.block_k, fp8_qkv.block_n) == (False, 2048, 8)
    assert (fp8_gate_up.use_dot, fp8_gate_up.block_n) == (False, 16) and default_config(6144, 2, fp8_weight=True).use_dot
    assert default_config(4096, 1, h200_sms) == default_config(4096)  # 128 programs of 32: enough
    assert default_config(28672, 1, h200_sms).block_n == 64
    assert not _fills_sms(512, default_config(512, 1, h200_sms), h200_sms)  # too short even so: cuBLAS


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 14336), (5000, 1000)])
@pytest.mark.parametrize("programmatic_launch", [True, False])
def test_skinny_gemm_on_gpu(rows: int, shape: tuple[int, int], programmatic_launch: bool) -> None:
    """Default tiles (wide, or narrow multiply-and-sum ones for one row of q/k/v's shape), launched with
    and without PDL (whose path fetches the first weight tile before waiting; used on Hopper and newer)."""
    from pagedserve.engine.kernels.decode_linear import default_config
    from pagedserve.engine.kernels.launch import supports_programmatic_launch

    out_features, in_features = shape
    config = default_config(out_features, rows, torch.cuda.get_device_properties(0).multi_processor_count)
    as_tuple = (config.block_n, config.block_k, config.num_warps, config.num_stages, config.use_dot)
    use_pdl = programmatic_launch and supports_programmatic_launch(torch.device("cuda"))
    for dtype in ("bfloat16", "float16"):
        result = run_case(rows, out_features, in_features, dtype, True, as_tuple, "cuda", use_pdl)
        assert result["shape_ok"] == 1.0 and result["max_error"] < 2e-2, (dtype, result)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_decode_linear_compiled_and_in_a_cuda_graph() -> None:
    """The custom op inside torch.compile and a captured graph gives F.linear's result, kernel or not."""
    from pagedserve.engine.kernels.decode_linear import uses_kernel

    torch.manual_seed(0)
    layer = nn.Linear(4096, 14336, bias=False, device="cuda", dtype=torch.bfloat16)
    use_decode_linear(layer)
    compiled = torch.compile(layer, dynamic=False)
    for rows in (1, 8, 64):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        assert uses_kernel(x, layer.weight) == (rows == 1)
        expected = F.linear(x.float(), layer.weight.float())
        with torch.inference_mode():  # as the engine runs (the op has no backward)
            static_in = torch.zeros_like(x)
            side = torch.cuda.Stream()  # warm up (and compile) off the capture, as torch's docs ask
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    compiled(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = compiled(static_in)
            static_in.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
        error = (static_out.float() - expected).abs().max() / expected.abs().max()
        assert error < 2e-2, (rows, error.item())


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(8, 6)
        self.k = nn.Linear(8, 2)
        self.o = nn.Linear(8, 8, bias=False)
        self.hooked = nn.Linear(8, 4)
        self.hooked.register_forward_hook(lambda _m, _i, output: output * 2)
        self.custom = _OwnLinear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qk = torch.cat([self.q(x), self.k(x)], dim=-1)  # q and k: siblings of x, fused
        return torch.cat([qk, self.o(qk), self.hooked(x), self.custom(x)], dim=-1)


class _OwnLinear(nn.Linear):
    """Stands for a quantized layer: a subclass with its own forward, which must be left alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def test_swap_routes_plain_linears_and_fused_leads_and_undo_restores() -> None:
    block = Block()
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = block(x)
        fusion = ProjectionFusion.watch(block)
        block(x)
        fusion.apply()
        weights_before = {name: p.data_ptr() for name, p in block.named_parameters()}
        swap = use_decode_linear(block)
        assert type(block.q) is DecodeFusedLead and type(block.o) is DecodeLinear
        assert type(block.hooked) is DecodeLinear and type(block.custom) is _OwnLinear
        assert {name: p.data_ptr() for name, p in block.named_parameters()} == weights_before
        torch.testing.assert_close(block(x), expected)  # CPU: F.linear; hooks still run
        one_row = x[:1]
        torch.testing.assert_close(block(one_row), expected[:1])  # through the op (which falls back on CPU)
        compiled = torch.compile(block, backend="aot_eager")  # the op's fake implementation traces
        torch.testing.assert_close(compiled(x), expected)
        torch.testing.assert_close(compiled(one_row), expected[:1])
        swap.undo()
        assert type(block.q) is FusedLead and type(block.o) is nn.Linear and type(block.hooked) is nn.Linear
        fusion.undo()
        torch.testing.assert_close(block(x), expected)


def test_decode_linear_op_matches_f_linear_on_cpu() -> None:
    x = torch.randn(2, 3, 8)
    weight, bias = torch.randn(5, 8), torch.randn(5)
    torch.testing.assert_close(decode_linear(x, weight, bias, False), F.linear(x, weight, bias))
    torch.testing.assert_close(decode_linear(x, weight, None, False), F.linear(x, weight))


def test_launch_setting_is_per_model_not_per_process() -> None:
    """Two models swapped with different launch settings keep their own (no module-wide flag)."""
    first, second = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))
    use_decode_linear(first, use_pdl=True)
    swap = use_decode_linear(second, use_pdl=False)
    assert first[0].use_pdl is True and second[0].use_pdl is False
    swap.undo()
    assert type(second[0]) is nn.Linear and "use_pdl" not in second[0].__dict__ and first[0].use_pdl is True


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    _interpreter_worker()
