"""Triton kernels for the experts: a grouped GEMM over block-padded, expert-sorted pairs, and a per-pair kernel.

A pair is one (token, slot) of the router's top-k: pair p = token * k + slot, routed to expert topk_ids[p].

**Grouped** (`experts_triton`, many tokens; the scheme of vLLM's fused_moe). `align_pairs_to_blocks` sorts
the pairs by expert and pads each expert's run to a multiple of BLOCK_M, so that every block of BLOCK_M
sorted entries belongs to one expert; padding entries hold `num_pairs` (masked off). One program computes
BLOCK_M rows x BLOCK_N features of one block with `tl.dot`, reading only its expert's weight, and writes
its rows back at their pair positions (no unpermute pass):
- GEMM 1: rows gathered from the hidden states (row = pair // k), gate and up tiles of w13 read side by side
  and `SiLU(gate) * up` taken in the epilogue, so the [S, 2I] product is never stored: out [S, I];
- GEMM 2: rows of GEMM 1's output times w2, scaled by the pair's routing weight in the epilogue: [S, H], then
  summed over each token's k pairs.
Shapes are static given the token count: the padded length is bounded by S + min(E, S) * (BLOCK_M - 1)
(at most min(E, S) experts have pairs, each padding fewer than BLOCK_M entries), blocks past the end get
expert id E and return at once. No host sync: capturable in a CUDA graph.

**Rows** (`experts_rows`, a few tokens). No sorting: GEMM 1 has one program per (pair, feature block), which
reads its pair's hidden row and its expert's gate/up rows with a multiply-and-sum (CUDA cores; one row gains
nothing from a 16-row `tl.dot` tile, as in decode_linear.py); GEMM 2 has one program per (token, feature
block), which runs the token's k pairs through their experts' w2 rows and sums them with their routing
weights, writing the [T, H] output directly. Two kernels a layer, and only the chosen experts' weights are read
(a weight two pairs share is read twice; from L2 if it is still there).

Accumulation is in float32; float32 operands take IEEE products in `tl.dot` (not TF32), so the float32
kernels match the reference to rounding. The tile sizes are starting points, not tuned:
`bench/moe_bench.py --tune` times alternatives on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference runs instead
    triton = None


@dataclass(frozen=True)
class GroupedConfig:
    block_m: int  # pairs per block (one expert's)
    block_n: int  # output features per program
    block_k: int
    group_m: int  # blocks of M sharing a column sweep (L2 reuse of weight tiles)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowsConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def grouped_config(num_pairs: int, num_experts: int) -> GroupedConfig:
    """Tiles by the mean pairs per expert: 16-row blocks when experts get a few rows each (decode batches),
    larger ones as the rows per expert grow (prefill). Starting points for `--tune`."""
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:
        return GroupedConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=3)
    if rows_per_expert <= 64:
        return GroupedConfig(block_m=32, block_n=64, block_k=64, group_m=4, num_warps=4, num_stages=4)
    if rows_per_expert <= 256:
        return GroupedConfig(block_m=64, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)
    return GroupedConfig(block_m=128, block_n=64, block_k=64, group_m=8, num_warps=8, num_stages=3)


def rows_config(num_rows: int, out_features: int, in_features: int, num_sms: int | None) -> RowsConfig:
    """Narrow feature blocks until the grid has about two programs per SM (one token's down projection,
    H=2048, is 128 programs of 16 features: under one per SM on an H200)."""
    block_n = 16
    while block_n > 4 and num_sms is not None and num_rows * -(-out_features // block_n) < 2 * num_sms:
        block_n //= 2
    block_k = min(512, triton.next_power_of_2(in_features)) if triton is not None else 512
    return RowsConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=3)


def align_pairs_to_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs, block_experts): pair indices sorted by expert (stable), each expert's run padded with
    `num_pairs` to a multiple of `block_m`, int32 [num_blocks * block_m]; the expert of each block, int32
    [num_blocks] (`num_experts` for blocks past the last expert's). Shapes depend on the pair count only."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    num_blocks = -(-(num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    destination = (padded_end - padded)[sorted_experts] + torch.arange(num_pairs, device=flat.device) \
        - first_of_expert[sorted_experts]
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs.scatter_(0, destination, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=flat.device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_experts


if triton is not None:

    @triton.jit
    def _grouped_kernel(
        a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pairs_ptr, block_experts_ptr,
        num_pairs, num_experts, num_blocks, N, K, up_offset,
        stride_am, stride_be, stride_bn, stride_bk, stride_cm,
        TOP_K: tl.constexpr, GATHER_TOKENS: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # `up_offset`: elements from a gate row of w13 to its up row (N rows on). Blocks of M in groups of
        # GROUP_M sweep the feature blocks together, so weight tiles are reused in L2.
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group_width = GROUP_M * num_pid_n
        first_m = (pid // group_width) * GROUP_M
        group_rows = tl.minimum(num_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % group_width) % group_rows
        pid_n = (pid % group_width) // group_rows
        expert = tl.load(block_experts_ptr + pid_m)
        if expert >= num_experts:  # past the last expert's padded run
            return
        pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_valid = pairs < num_pairs
        if GATHER_TOKENS:
            a_rows = pairs // TOP_K
        else:
            a_rows = pairs
        ks = tl.arange(0, BLOCK_K)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + ks[None, :]
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_step in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k_step * BLOCK_K
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_valid[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=row_valid[:, None] & (ks[None, :] < k_left), other=0.0)
                b = tl.load(b_ptrs, mask=col_valid[None, :] & (ks[:, None] < k_left), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GATED:
                if EVEN_K:
                    b_up = tl.load(b_ptrs + up_offset, mask=col_valid[None, :], other=0.0)
                else:
                    b_up = tl.load(b_ptrs + up_offset, mask=col_valid[None, :] & (ks[:, None] < k_left), other=0.0)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up
        if MUL_WEIGHT:
            acc *= tl.load(weights_ptr + pairs, mask=row_valid, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])

    @triton.jit
    def _rows_kernel(
        a_ptr, b_ptr, c_ptr, ids_ptr, weights_ptr,
        N, K, up_offset,
        stride_am, stride_be, stride_bn, stride_bk, stride_cm,
        TOP_K: tl.constexpr, SLOTS: tl.constexpr, GATHER_TOKENS: tl.constexpr, GATED: tl.constexpr,
        MUL_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        # Program (row, feature block): a row is one pair (SLOTS=1) or one token whose SLOTS=TOP_K pairs are
        # summed here.
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for slot in tl.static_range(SLOTS):
            pair = row * SLOTS + slot
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            if GATHER_TOKENS:
                a_row = pair // TOP_K
            else:
                a_row = pair
            x_ptrs = a_ptr + a_row.to(tl.int64) * stride_am + ks
            w_ptrs = b_ptr + expert * stride_be + cols[:, None].to(tl.int64) * stride_bn + ks[None, :] * stride_bk
            part = tl.zeros((BLOCK_N,), dtype=tl.float32)
            part_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k_step in range(0, tl.cdiv(K, BLOCK_K)):
                k_left = K - k_step * BLOCK_K
                if EVEN_K:
                    x = tl.load(x_ptrs).to(tl.float32)
                    w = tl.load(w_ptrs, mask=col_valid[:, None], other=0.0)
                else:
                    x = tl.load(x_ptrs, mask=ks < k_left, other=0.0).to(tl.float32)
                    w = tl.load(w_ptrs, mask=col_valid[:, None] & (ks[None, :] < k_left), other=0.0)
                part += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
                if GATED:
                    if EVEN_K:
                        w_up = tl.load(w_ptrs + up_offset, mask=col_valid[:, None], other=0.0)
                    else:
                        w_up = tl.load(w_ptrs + up_offset, mask=col_valid[:, None] & (ks[None, :] < k_left), other=0.0)
                    part_up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_bk
            if GATED:
                part = part * tl.sigmoid(part) * part_up
            if MUL_WEIGHT:
                part *= tl.load(weights_ptr + pair).to(tl.float32)
            acc += part
        tl.store(c_ptr + row.to(tl.int64) * stride_cm + cols, acc.to(c_ptr.dtype.element_ty), mask=col_valid)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_operands(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    if hidden.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("hidden [T, H], w13 [E, 2I, H] and w2 [E, H, I] need a contiguous last dimension")
    if w13.shape[2] != hidden.shape[1] or w2.shape[1] != hidden.shape[1] or w13.shape[1] != 2 * w2.shape[2]:
        raise ValueError(f"shapes do not chain: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")


def grouped_gemm(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
                 sorted_pairs: torch.Tensor, block_experts: torch.Tensor, top_k: int, *, gather_tokens: bool,
                 gated: bool, mul_weight: bool, config: GroupedConfig) -> None:
    """One grouped GEMM of `experts_triton` into `out` [S, N] (N = the gate half for a gated w13)."""
    num_pairs = out.shape[0]
    out_features = weight.shape[1] // 2 if gated else weight.shape[1]
    in_features = weight.shape[2]
    num_blocks = block_experts.shape[0]
    grid = (num_blocks * triton.cdiv(out_features, config.block_n),)
    _grouped_kernel[grid](
        a, weight, out, weights, sorted_pairs, block_experts,
        num_pairs, weight.shape[0], num_blocks, out_features, in_features, out_features * weight.stride(1),
        a.stride(0), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0),
        TOP_K=top_k, GATHER_TOKENS=gather_tokens, GATED=gated, MUL_WEIGHT=mul_weight,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        EVEN_K=in_features % config.block_k == 0, PRECISION=_precision(a.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def experts_triton(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, config: GroupedConfig | None = None) -> torch.Tensor:
    """Same contract as `experts_reference` (engine/kernels/moe/reference.py), through the grouped kernel."""
    _check_operands(hidden, w13, w2)
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    out = torch.empty((num_tokens, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    if num_pairs == 0:
        return out
    config = config or grouped_config(num_pairs, w13.shape[0])
    sorted_pairs, block_experts = align_pairs_to_blocks(topk_ids, w13.shape[0], config.block_m)
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty((num_pairs, w2.shape[2]), dtype=hidden.dtype, device=hidden.device)
    grouped_gemm(hidden, w13, act, weights, sorted_pairs, block_experts, top_k, gather_tokens=True, gated=True,
                 mul_weight=False, config=config)
    down = torch.empty((num_pairs, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    grouped_gemm(act, w2, down, weights, sorted_pairs, block_experts, top_k, gather_tokens=False, gated=False,
                 mul_weight=True, config=config)
    return torch.sum(down.view(num_tokens, top_k, -1), dim=1, out=out)


def rows_gemm(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              top_k: int, *, slots: int, gather_tokens: bool, gated: bool, mul_weight: bool,
              config: RowsConfig) -> None:
    """One GEMM of `experts_rows` into `out` [rows, N]: a row is a pair (slots=1) or a token (slots=top_k)."""
    out_features = weight.shape[1] // 2 if gated else weight.shape[1]
    in_features = weight.shape[2]
    grid = (out.shape[0], triton.cdiv(out_features, config.block_n))
    _rows_kernel[grid](
        a, weight, out, ids, weights,
        out_features, in_features, out_features * weight.stride(1),
        a.stride(0), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0),
        TOP_K=top_k, SLOTS=slots, GATHER_TOKENS=gather_tokens, GATED=gated, MUL_WEIGHT=mul_weight,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=in_features % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def experts_rows(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, configs: tuple[RowsConfig, RowsConfig] | None = None) -> torch.Tensor:
    """Same contract as `experts_reference`, one program per pair (GEMM 1) and per token (GEMM 2)."""
    _check_operands(hidden, w13, w2)
    num_tokens, top_k = topk_ids.shape
    hidden_size, intermediate = hidden.shape[1], w2.shape[2]
    out = torch.empty((num_tokens, hidden_size), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return out
    if configs is None:
        num_sms = _num_sms(hidden.device) if hidden.is_cuda else None
        configs = (rows_config(num_tokens * top_k, intermediate, hidden_size, num_sms),
                   rows_config(num_tokens, hidden_size, intermediate, num_sms))
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty((num_tokens * top_k, intermediate), dtype=hidden.dtype, device=hidden.device)
    rows_gemm(hidden, w13, act, ids, weights, top_k, slots=1, gather_tokens=True, gated=True, mul_weight=False,
              config=configs[0])
    rows_gemm(act, w2, out, ids, weights, top_k, slots=top_k, gather_tokens=False, gated=False, mul_weight=True,
              config=configs[1])
    return out


@functools.cache
def _num_sms_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())
