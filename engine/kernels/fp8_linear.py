"""FP8 linear layers: float8_e4m3 weights with one scale per output feature, activations scaled per token.

A decode step reads every weight once; in FP8 that is half the bytes of bf16, and Hopper's tensor cores
multiply FP8 at twice bf16's rate. `quantize_weight` turns a weight into e4m3 values and a float32 scale
per output row (its largest magnitude maps to e4m3's largest finite value, 448), so a row with a few large
weights does not flatten the others. At run time each input row gets its own scale the same way (dynamic,
per token) and the product is `(x_q @ w_q.T) * scale_x * scale_w`, accumulated in float32 and returned in
the input's dtype:

- on Hopper or newer (compute capability 9.0+) through `torch._scaled_mm` with row-wise scales (one GEMM;
  the scales are applied in its epilogue; the activations are quantized by one Triton kernel,
  engine/kernels/fp8_quant.py; torch's row-wise kernel needs Hopper's TMA, so Ada's FP8 tensor
  cores, 8.9, are not used);
- elsewhere through the reference: the same quantized activations and weights, dequantized and
  multiplied in float32 (what tests check on CPU, and what the GPU path must match).

`quantize_linears(model)` swaps a model's plain `nn.Linear` layers for `Fp8Linear` in place (the LM head
and embeddings stay in the model's dtype: their error shows in every logit, and the LM head is one GEMM
of many). An `Fp8Linear` is not an `nn.Linear`: projection fusion (engine/kernels/fused_projections.py) fuses
FP8 siblings into one FP8 GEMM (weights and scales concatenated), and the one-row decode GEMM
(engine/kernels/decode_linear.py) has an FP8-weight variant: one-token steps read the weight as FP8 and
multiply it with unquantized activations (the weight read is the whole cost there). `fp8_gemm` takes rows
already quantized: an FP8 gated MLP (engine/kernels/fp8_mlp.py) quantizes its down projection's input in the
kernel of its activation.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pagedserve.engine.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, MIN_SCALE, quantize_rows, quantize_rows_fp8

logger = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (9, 0)  # row-wise scaled _scaled_mm (see the module docstring)
# `_scaled_mm(use_fast_accum=...)`: Hopper's FP8 tensor cores keep partial sums in their own accumulator instead
# of promoting them to float32 every few k-steps (CUTLASS's FP8FastAccum schedules; vLLM's and TensorRT-LLM's FP8
# GEMMs run so). On an H100 it made W1's FP8 GEMMs 4-11% faster and W1 7% faster, and on a model trained on text
# it left held-out perplexity where the promoted accumulation had it (docs/benchmarks.md, "FP8 GEMMs with fast
# accumulation"). Read when a GEMM is traced or captured, like the shapes; the benchmarks' `--no-fp8-fast-accum`
# turns it off for their process.
FAST_ACCUMULATION = True


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [N, K] weight to e4m3 and float32 scales [N] (one per output feature)."""
    quantized, scale = quantize_rows(weight)
    return quantized, scale.squeeze(-1)


def supports_fp8_gemm(device: torch.device) -> bool:
    """Row-wise scaled FP8 GEMMs: Hopper (9.0) or newer, with a torch that has `_scaled_mm`."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What the FP8 GEMM computes, in plain PyTorch: per-token quantized x times the dequantized weight."""
    x_q, x_scale = quantize_rows(x)
    return fp8_gemm(x_q, x_scale, weight, weight_scale, bias, x.dtype, use_scaled_mm=False)


def fp8_linear_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The FP8 GEMM on tensor cores: x [M, K] (any float dtype), weight [N, K] e4m3, scales [N]."""
    x_q, x_scale = quantize_rows_fp8(x)  # one kernel (engine/kernels/fp8_quant.py)
    return fp8_gemm(x_q, x_scale, weight, weight_scale, bias, x.dtype, use_scaled_mm=True)


def fp8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, use_scaled_mm: bool) -> torch.Tensor:
    """The product of rows already quantized (x_q [M, K] e4m3, x_scale [M, 1] float32: `quantize_rows`'
    output) with an FP8 weight, in `out_dtype`: on tensor cores or as the reference's float32 product. The FP8
    MLP (engine/kernels/fp8_mlp.py) quantizes its down projection's input in the activation's own kernel and
    comes in here."""
    if not use_scaled_mm:
        product = (x_q.float() * x_scale) @ (weight.float() * weight_scale.float()[:, None]).T
        if bias is not None:
            product = product + bias.float()
        return product.to(out_dtype)
    # _scaled_mm wants the second operand column-major: weight.T of a row-major [N, K] weight is. The bias is
    # added after: row-wise scaling takes no bias in every torch build.
    out = torch._scaled_mm(x_q, weight.T, scale_a=x_scale, scale_b=weight_scale[None, :].float(), out_dtype=out_dtype,
                           use_fast_accum=FAST_ACCUMULATION)
    return out if bias is None else out + bias


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               use_scaled_mm: bool) -> torch.Tensor:
    """`x @ dequantized(weight).T + bias` for x of any leading shape, on tensor cores or by the reference."""
    rows = x.reshape(-1, x.shape[-1])
    gemm = fp8_linear_scaled_mm if use_scaled_mm else fp8_linear_reference
    return gemm(rows, weight, weight_scale, bias).reshape(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Module):
    """`y = x @ W.T + b` with W stored as e4m3 and a float32 scale per output feature."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 use_scaled_mm: bool) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.use_scaled_mm = use_scaled_mm

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_scaled_mm: bool) -> "Fp8Linear":
        weight, scale = quantize_weight(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data
        return cls(weight, scale, bias, use_scaled_mm)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.use_scaled_mm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{'scaled_mm' if self.use_scaled_mm else 'reference'}")


def quantize_linears(model: nn.Module, use_scaled_mm: bool | None = None) -> int:
    """Replace every plain `nn.Linear` of `model` but its output embeddings (the LM head) by an `Fp8Linear`,
    in place, one at a time (the bf16 weight of a layer is freed before the next is quantized). Returns how
    many were replaced. `use_scaled_mm` None: where the weights are, if that device has FP8 tensor cores."""
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Names, not modules: holding the old layers would keep every bf16 weight alive to the end.
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear and module is not lm_head]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        fast = supports_fp8_gemm(child.weight.device) if use_scaled_mm is None else use_scaled_mm
        if fast and (child.in_features % 16 or child.out_features % 16):
            fast = False  # _scaled_mm needs both dimensions in multiples of 16
        setattr(parent, child_name, Fp8Linear.from_linear(child, fast))
        del child
    replaced = len(names)
    logger.info("quantized %d linear layers to FP8 (e4m3, a scale per output feature; activations per token)",
                replaced)
    return replaced
