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
"""

from __future__ import annotations

import torch

from pagedserve.engine.kernels.moe.reference import gated_silu

MIN_CAPABILITY = (9, 0)


def grouped_mm_unavailable(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str | None:
    """Why `experts_grouped_mm` cannot run on these operands here, or None."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    if hidden.dtype != torch.bfloat16 or w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
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


def experts_grouped_mm(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Same contract as `experts_reference`; the caller checked `grouped_mm_unavailable`."""
    num_tokens, top_k = topk_ids.shape
    order, offsets = sort_pairs(topk_ids, w13.shape[0])
    rows = hidden[order // top_k]  # [S, H], grouped by expert
    act = gated_silu(torch._grouped_mm(rows, w13.transpose(1, 2), offs=offsets))
    down = torch._grouped_mm(act, w2.transpose(1, 2), offs=offsets)  # [S, H]
    # Weighted in the model's dtype, as transformers' grouped_mm path does: a float32 copy of [S, H] would
    # double this step's memory traffic at prefill sizes. The sum over a token's k pairs accumulates in float32.
    down.mul_(topk_weights.reshape(-1)[order].to(down.dtype)[:, None])
    pairs = torch.empty_like(down)
    pairs[order] = down  # back to (token, slot) order
    return pairs.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)
