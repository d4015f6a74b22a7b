"""FP8 experts: a MoE block's expert weights in e4m3 with a float32 scale per (expert, output row).

`quantization="fp8"` with the fused MoE path (`moe_backend` fused) stores `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I] as float8_e4m3fn parameters, with `gate_up_proj_scale` [E, 2I] and `down_proj_scale`
[E, H] beside them (float32, multiplied: weight = e4m3 * scale). That is the linear layers' scheme
(engine/kernels/fp8_linear.py: a scale per output feature), one expert at a time, with the same rounding
(`quantize_e4m3` through `quantize_rows_triton` on a GPU, its bit-exact PyTorch twin `quantize_rows`
elsewhere). The FP8 tensors replace the
bf16 parameters on the module itself, so the memory plan, which measures parameters, counts 1 byte a weight
plus 4 per row.

What runs them (`pagedserve::fused_experts` with scales; engine/kernels/moe/experts.py):
- `rows` (T <= 8): W8A16, the activations stay bf16; the kernels read e4m3 rows (half a bf16 step's bytes) and
  apply the row scales in the epilogue;
- `triton` / `grouped_mm` (larger T): W8A8, as vLLM's fused_moe with fp8_w8a8 per-channel: each GEMM's input
  rows are quantized per token (per pair for GEMM 2), the product runs on FP8 tensor cores, and the token and
  row scales are applied to the float32 accumulator;
- `reference` (CPU, tests): the dequantized weights through the PyTorch loop, in float32.

A module's transformers forward cannot run FP8 weights, so experts are quantized only where the fused path
takes them (resolve decides `LoadSettings.fp8_experts`; `quantize_experts` in experts.py skips the families
the fused path does not take).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.engine.kernels.fp8_quant import FP8_DTYPE, quantize_rows, quantize_rows_triton, triton

SCALE_SUFFIX = "_scale"  # gate_up_proj -> gate_up_proj_scale


def quantize_expert_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (e4m3 [E, N, K], float32 scales [E, N]): on a GPU one Triton kernel over the stack's rows
    (no float32 temporary); elsewhere one expert at a time (a float32 temporary of one expert, not the stack)."""
    if weight.is_cuda and triton is not None and weight.is_contiguous():
        values, scales = quantize_rows_triton(weight.reshape(-1, weight.shape[-1]))
        return values.view(weight.shape), scales.view(weight.shape[:2])
    quantized = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    scales = torch.empty(weight.shape[:2], dtype=torch.float32, device=weight.device)
    for expert in range(weight.shape[0]):
        values, scale = quantize_rows(weight[expert])
        quantized[expert] = values
        scales[expert] = scale.squeeze(-1)
    return quantized, scales


def dequantize_expert_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
                             ) -> torch.Tensor:
    """e4m3 [..., N, K] times its row scales [..., N], computed in float32, in `dtype`."""
    return (weight.float() * scale.float()[..., None]).to(dtype)


def expert_scales(experts: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The module's (gate_up_proj_scale, down_proj_scale); (None, None) for experts in the model's dtype."""
    return (getattr(experts, "gate_up_proj" + SCALE_SUFFIX, None), getattr(experts, "down_proj" + SCALE_SUFFIX, None))


def is_fp8_experts(experts: nn.Module) -> bool:
    return getattr(experts, "gate_up_proj", None) is not None and experts.gate_up_proj.dtype == FP8_DTYPE


def fp8_scales_problem(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
                       w2_scale: torch.Tensor | None) -> str | None:
    """Why FP8 expert weights and their scales do not fit together, or None (also None for unscaled weights)."""
    is_fp8 = (w13.dtype == FP8_DTYPE, w2.dtype == FP8_DTYPE)
    if not any(is_fp8):
        return None if w13_scale is None and w2_scale is None else "scales given for expert weights that are not FP8"
    if not all(is_fp8):
        return f"expert weights of dtypes {w13.dtype} and {w2.dtype} (both e4m3, or neither)"
    if w13_scale is None or w2_scale is None:
        return "FP8 expert weights without their row scales"
    if w13_scale.dtype != torch.float32 or w2_scale.dtype != torch.float32:
        return f"FP8 expert scales of dtype {w13_scale.dtype} and {w2_scale.dtype} (float32 expected)"
    if tuple(w13_scale.shape) != tuple(w13.shape[:2]) or tuple(w2_scale.shape) != tuple(w2.shape[:2]):
        return (f"FP8 expert scales of shapes {tuple(w13_scale.shape)} and {tuple(w2_scale.shape)} for weights "
                f"{tuple(w13.shape)} and {tuple(w2.shape)} (one per expert and output row expected)")
    if w13_scale.stride(-1) != 1 or w2_scale.stride(-1) != 1:
        return "FP8 expert scales without a contiguous last dimension"
    return None


def set_expert_weights(experts: nn.Module, gate_up: torch.Tensor, down: torch.Tensor,
                       gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None) -> None:
    """Put these weights (and, for FP8, their row scales) on the module as its parameters, replacing the old
    ones (no reference to them is kept)."""
    experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = nn.Parameter(down, requires_grad=False)
    for name, scale in (("gate_up_proj", gate_up_scale), ("down_proj", down_scale)):
        if scale is not None:
            setattr(experts, name + SCALE_SUFFIX, nn.Parameter(scale, requires_grad=False))
        elif hasattr(experts, name + SCALE_SUFFIX):
            delattr(experts, name + SCALE_SUFFIX)
