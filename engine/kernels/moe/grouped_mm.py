"""The experts as two `torch._grouped_mm` calls (CUTLASS grouped GEMMs) over expert-sorted pairs.

A (token, slot) pair is a row; rows are sorted by expert (stable), gathered from the hidden states, and
`offs` (cumulative rows per expert, int32) cuts them into one group per expert, empty groups included, so
every shape depends on the token count only: no host sync, capturable in a CUDA graph. The weights are
used where they are: `w13.transpose(1, 2)` of transformers' contiguous [E, 2I, H] is the column-major
[E, H, 2I] the kernel wants, no copy.

What torch requires (aten's `_grouped_mm` checks, mirrored by its meta function): bfloat16 operands; 2-D x
3-D with `offs`; row strides that are multiples of 16 bytes (H and I multiples of 8 in bf16). The CUDA
kernel needs compute capability 9.0 in torch 2.8 and 8.0+ from 2.9; we take it on 9.0+ only, where it was
measured (bench/moe_bench.py). torch has a CPU kernel too (2.9+), which the CPU tests use.

FP8 experts (engine/kernels/moe/fp8.py) take `torch._scaled_grouped_mm` instead: W8A8 as the Triton grouped
kernel (each GEMM's input rows quantized per row by `quantize_rows_fp8`, row-wise scales: scale_a one per row,
scale_b [E, N] one per expert and output row, bf16 out). Its CUDA kernel needs compute capability 9.0 and K, N in
multiples of 16 bytes; it has no CPU kernel, so on CPU only its argument checks (the meta function) are tested.
"""

from __future__ import annotations

import torch

from pagedserve.engine.kernels.fp8_quant import FP8_DTYPE, quantize_rows_fp8
from pagedserve.engine.kernels.moe.reference import gated_silu

MIN_CAPABILITY = (9, 0)


def grouped_mm_unavailable(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str | None:
    """Why `experts_grouped_mm` cannot run on these operands here, or None."""
    if w13.dtype == FP8_DTYPE:
        if not hasattr(torch, "_scaled_grouped_mm"):
            return f"torch {torch.__version__} has no _scaled_grouped_mm (FP8 experts)"
        if hidden.dtype != torch.bfloat16 or w2.dtype != FP8_DTYPE:
            return f"_scaled_grouped_mm takes e4m3 experts with bfloat16 activations, not {hidden.dtype}"
        if hidden.shape[1] % 16 or w2.shape[2] % 16:
            return (f"_scaled_grouped_mm needs 16-byte rows: hidden {hidden.shape[1]} and expert width {w2.shape[2]} "
                    "multiples of 16")
        if not hidden.is_cuda:
            return "_scaled_grouped_mm has no CPU kernel"
    elif not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    elif hidden.dtype != torch.bfloat16 or w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
        return f"_grouped_mm takes bfloat16 only, not {hidden.dtype}"
    if hidden.shape[1] % 8 or w2.shape[2] % 8:
        return f"_grouped_mm needs 16-byte rows: hidden {hidden.shape[1]} and expert width {w2.shape[2]} multiples of 8"
    if hidden.is_cuda:
        capability = torch.cuda.get_device_capability(hidden.device)
        if capability < MIN_CAPABILITY:
            return f"compute capability {capability[0]}.{capability[1]} (grouped_mm is used on 9.0+)"
    return None


def sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): pair indices (token * k + slot) sorted by expert, stable; int32 end row of each
    expert's group. Sync-free: counts by scatter_add (bincount on CUDA reads the max to the host)."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, torch.cumsum(counts, 0, dtype=torch.int32)


def _scaled_grouped_mm(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, offsets: torch.Tensor
                       ) -> torch.Tensor:
    """rows [S, K] (bf16) times each group's e4m3 weight [E, N, K] with row scales [E, N]: rows quantized per
    row, then one `_scaled_grouped_mm` with row-wise scales, bf16 [S, N]."""
    quantized, row_scales = quantize_rows_fp8(rows)
    return torch._scaled_grouped_mm(quantized, weight.transpose(1, 2), row_scales.view(-1), weight_scale,
                                    offs=offsets, out_dtype=torch.bfloat16)


def experts_grouped_mm(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None = None,
                       w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `experts_reference`; the caller checked `grouped_mm_unavailable`. FP8 experts
    (`w13_scale`, `w2_scale`): `torch._scaled_grouped_mm`, W8A8 (module docstring)."""
    num_tokens, top_k = topk_ids.shape
    order, offsets = sort_pairs(topk_ids, w13.shape[0])
    rows = hidden[order // top_k]  # [S, H], grouped by expert
    if w13_scale is not None:
        act = gated_silu(_scaled_grouped_mm(rows, w13, w13_scale, offsets))
        down = _scaled_grouped_mm(act, w2, w2_scale, offsets)
    else:
        act = gated_silu(torch._grouped_mm(rows, w13.transpose(1, 2), offs=offsets))
        down = torch._grouped_mm(act, w2.transpose(1, 2), offs=offsets)  # [S, H]
    # Weighted in the model's dtype, as transformers' grouped_mm path does: a float32 copy of [S, H] would
    # double this step's memory traffic at prefill sizes. The sum over a token's k pairs accumulates in float32.
    down.mul_(topk_weights.reshape(-1)[order].to(down.dtype)[:, None])
    pairs = torch.empty_like(down)
    pairs[order] = down  # back to (token, slot) order
    return pairs.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)
