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

**Rows** (`experts_rows`, up to a few tokens: a decode step at batch 1 reads its k experts, 9.4 MB each on the
Qwen3-30B-A3B shape, and nothing else should take time). No sorting, two kernels, both streaming whole weight
rows (contiguous K) with a multiply-and-sum on the CUDA cores (one row gains nothing from a 16-row `tl.dot`
tile, as in decode_linear.py):
- GEMM 1 `_gate_up_rows_kernel`, one program per (pair, BLOCK_N features): the pair's token row against
  BLOCK_N gate rows and BLOCK_N up rows of its expert over all of K, `SiLU(gate) * up` in the epilogue
  ([T k, I], never the [T k, 2I] product). One token's 8 pairs x 768 features are 768 programs at 8 features:
  several per SM, so the read is spread over every SM without splitting K;
- GEMM 2 `_down_rows_kernel`, one program per (token, BLOCK_N features): the rows of all k of the token's
  experts are loaded together, a [k, BLOCK_N, BLOCK_K] tile a step (k independent reads in flight and one
  short loop over I, where a loop over the slots would wait on k chains of small loads), weighted by the
  routing weights and summed over k in registers: the [T, H] output is written once, no atomics, no
  reduction kernel, no zeroing.
Only the chosen experts' weights are read; pairs of different tokens sharing an expert read its rows at about
the same time (the pair axis of the grid varies fastest), so the second read is mostly an L2 hit. Tiles per
token count: `ROWS_TILES` (`bench/moe_bench.py --micro-only --tune` times the candidates of each GEMM).

**FP8 experts** (e4m3 weights with a float32 scale per expert and output row: engine/kernels/moe/fp8.py): the
per-pair kernels read the e4m3 rows and keep the activations in bf16 (W8A16: a batch-1 step reads half the
bytes), the row scales applied once to each float32 sum in the epilogue; the grouped kernel runs W8A8 (its
inputs quantized per row, the dot on FP8 tensor cores, both scales in the epilogue: `experts_triton`).

Accumulation is in float32; float32 operands take IEEE products in `tl.dot` (not TF32), so the float32
kernels match the reference to rounding. The grouped GEMM's tile sizes are starting points, not tuned:
`bench/moe_bench.py --tune` times alternatives on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.engine.kernels.fp8_quant import quantize_rows_fp8
from pagedserve.engine.kernels.launch import launch_options
from pagedserve.engine.kernels.moe.fp8 import fp8_scales_problem

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
    """Tiles of one per-pair GEMM. GEMM 1 (gate/up): BLOCK_N gate rows and as many up rows of one pair's
    expert a program; GEMM 2 (down): BLOCK_N output features of one token, read for all its k experts at once
    (k x BLOCK_N rows a step). Both stream BLOCK_K of the reduction a step (multiply-and-sum on CUDA cores)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowsTiles:
    gate_up: RowsConfig
    down: RowsConfig


# Per-pair tiles by token count: (largest token count, tiles), the fastest of `bench/moe_bench.py --micro-only
# --tune` on an H200 (Qwen3-30B-A3B layer: H 2048, I 768, k 8; the timings: docs/results/moe_h200_f6ea6fb.md).
# Gate/up: 8 gate and 8 up rows a program, 512 deep at one token and 1,024 from two; down: BLOCK_N features of
# one token for all its k experts.
ROWS_TILES: tuple[tuple[int, RowsTiles], ...] = (
    (1, RowsTiles(gate_up=RowsConfig(8, 512, 4, 3), down=RowsConfig(2, 256, 4, 3))),
    (2, RowsTiles(gate_up=RowsConfig(8, 1024, 4, 3), down=RowsConfig(8, 256, 8, 3))),
    (4, RowsTiles(gate_up=RowsConfig(8, 1024, 4, 3), down=RowsConfig(16, 64, 4, 3))),
    (8, RowsTiles(gate_up=RowsConfig(8, 1024, 4, 3), down=RowsConfig(8, 128, 4, 3))),
)
# FP8 weights (engine/kernels/moe/fp8.py), untuned: GEMM 1 steps twice as deep, so a step still brings 16 KB of
# weights in flight (the one-row FP8 GEMM's measured tiles were 2,048 deep: decode_linear.py); GEMM 2 keeps
# I = 768 in three even steps.
ROWS_TILES_FP8: tuple[tuple[int, RowsTiles], ...] = (
    (8, RowsTiles(gate_up=RowsConfig(8, 1024, 4, 3), down=RowsConfig(4, 256, 4, 3))),
)


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
        a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pairs_ptr, block_experts_ptr, a_scale_ptr, b_scale_ptr,
        num_pairs, num_experts, num_blocks, N, K, up_offset,
        stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_bse,
        TOP_K: tl.constexpr, GATHER_TOKENS: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
    ):
        # `up_offset`: elements from a gate row of w13 to its up row (N rows on). Blocks of M in groups of
        # GROUP_M sweep the feature blocks together, so weight tiles are reused in L2. FP8 (W8A8): a and b are
        # e4m3, the dot runs on FP8 tensor cores into float32, and the epilogue multiplies each row by its
        # input row's scale (a_scale [rows]) and each feature by its expert row's scale (b_scale [E, rows of b]).
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
        if FP8:
            a_scale = tl.load(a_scale_ptr + a_rows, mask=row_valid, other=0.0)[:, None]
            b_scale_ptrs = b_scale_ptr + expert.to(tl.int64) * stride_bse + cols
            acc = acc * a_scale * tl.load(b_scale_ptrs, mask=col_valid, other=0.0)[None, :]
            if GATED:  # the up rows' scales sit N rows on, as the rows do
                acc_up = acc_up * a_scale * tl.load(b_scale_ptrs + N, mask=col_valid, other=0.0)[None, :]
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up
        if MUL_WEIGHT:
            acc *= tl.load(weights_ptr + pairs, mask=row_valid, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])

    @triton.jit
    def _gate_up_rows_kernel(
        x_ptr, w13_ptr, act_ptr, ids_ptr, scale_ptr,
        N, K, up_offset,
        stride_xm, stride_we, stride_wn, stride_am, stride_se,
        TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        STREAM_WEIGHTS: tl.constexpr, USE_PDL: tl.constexpr, W_SCALED: tl.constexpr,
    ):
        # Program (pair, feature block): BLOCK_N gate rows and the matching up rows of the pair's expert,
        # streamed over the whole of K, times the pair's token row; act = SiLU(gate) * up in the epilogue.
        # Axis 0 (pairs) varies fastest, so pairs of different tokens sharing an expert read the same rows at
        # about the same time (the second read is an L2 hit).
        if USE_PDL:  # the expert id comes from the kernel before: nothing to fetch before the wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pair = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        ks = tl.arange(0, BLOCK_K)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        x_ptrs = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm + ks
        w_ptrs = w13_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
        gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
        up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k_step in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                x = tl.load(x_ptrs).to(tl.float32)
                w_mask = col_valid[:, None]
            else:
                k_valid = ks < K - k_step * BLOCK_K
                x = tl.load(x_ptrs, mask=k_valid, other=0.0).to(tl.float32)
                w_mask = col_valid[:, None] & k_valid[None, :]
            if STREAM_WEIGHTS:  # read once: keep them from evicting the activations in L2
                w_gate = tl.load(w_ptrs, mask=w_mask, other=0.0, eviction_policy="evict_first")
                w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0, eviction_policy="evict_first")
            else:
                w_gate = tl.load(w_ptrs, mask=w_mask, other=0.0)
                w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)
            gate += tl.sum(w_gate.to(tl.float32) * x[None, :], axis=1)
            up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if W_SCALED:  # FP8 weights (W8A16): each row's scale, gate rows then up rows N on
            scale_ptrs = scale_ptr + expert * stride_se + cols
            gate *= tl.load(scale_ptrs, mask=col_valid, other=0.0)
            up *= tl.load(scale_ptrs + N, mask=col_valid, other=0.0)
        act = gate * tl.sigmoid(gate) * up
        tl.store(act_ptr + pair.to(tl.int64) * stride_am + cols, act.to(act_ptr.dtype.element_ty), mask=col_valid)

    @triton.jit
    def _down_rows_kernel(
        act_ptr, w2_ptr, out_ptr, ids_ptr, weights_ptr, scale_ptr,
        N, K,
        stride_am, stride_we, stride_wn, stride_om, stride_se,
        TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, STREAM_WEIGHTS: tl.constexpr, USE_PDL: tl.constexpr, W_SCALED: tl.constexpr,
    ):
        # Program (token, feature block): the rows of all the token's k experts are read together, one
        # [SLOTS, BLOCK_N, BLOCK_K] tile a step (k independent streams in flight, one loop over K, not k
        # loops one after another), each slot's sum weighted and the k sums added here: the [T, H] output is
        # written once, with no atomics and no separate reduction.
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        token = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        slots = tl.arange(0, SLOTS)
        slot_valid = slots < TOP_K
        ks = tl.arange(0, BLOCK_K)
        pairs = token.to(tl.int64) * TOP_K + slots
        experts = tl.load(ids_ptr + pairs, mask=slot_valid, other=0).to(tl.int64)
        routing = tl.load(weights_ptr + pairs, mask=slot_valid, other=0.0).to(tl.float32)
        a_ptrs = act_ptr + pairs[:, None] * stride_am + ks[None, :]
        w_ptrs = (w2_ptr + experts[:, None, None] * stride_we + cols[None, :, None].to(tl.int64) * stride_wn
                  + ks[None, None, :])
        row_valid = slot_valid[:, None, None] & col_valid[None, :, None]
        acc = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
        for k_step in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=slot_valid[:, None], other=0.0)
                w_mask = row_valid
            else:
                k_valid = ks < K - k_step * BLOCK_K
                a = tl.load(a_ptrs, mask=slot_valid[:, None] & k_valid[None, :], other=0.0)
                w_mask = row_valid & k_valid[None, None, :]
            if STREAM_WEIGHTS:
                w = tl.load(w_ptrs, mask=w_mask, other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[:, None, :], axis=2)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if W_SCALED:  # FP8 weights (W8A16): each slot's expert's row scales
            acc *= tl.load(scale_ptr + experts[:, None] * stride_se + cols[None, :],
                           mask=slot_valid[:, None] & col_valid[None, :], other=0.0)
        out = tl.sum(acc * routing[:, None], axis=0)
        tl.store(out_ptr + token.to(tl.int64) * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=col_valid)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_operands(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None = None,
                    w2_scale: torch.Tensor | None = None) -> None:
    if hidden.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("hidden [T, H], w13 [E, 2I, H] and w2 [E, H, I] need a contiguous last dimension")
    if w13.shape[2] != hidden.shape[1] or w2.shape[1] != hidden.shape[1] or w13.shape[1] != 2 * w2.shape[2]:
        raise ValueError(f"shapes do not chain: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    problem = fp8_scales_problem(w13, w2, w13_scale, w2_scale)
    if problem is not None:
        raise ValueError(problem)


def grouped_gemm(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
                 sorted_pairs: torch.Tensor, block_experts: torch.Tensor, top_k: int, *, gather_tokens: bool,
                 gated: bool, mul_weight: bool, config: GroupedConfig, a_scale: torch.Tensor | None = None,
                 weight_scale: torch.Tensor | None = None) -> None:
    """One grouped GEMM of `experts_triton` into `out` [S, N] (N = the gate half for a gated w13). FP8: `a` and
    `weight` e4m3, `a_scale` one float32 per row of `a`, `weight_scale` [E, rows of weight]."""
    num_pairs = out.shape[0]
    out_features = weight.shape[1] // 2 if gated else weight.shape[1]
    in_features = weight.shape[2]
    num_blocks = block_experts.shape[0]
    is_fp8 = weight_scale is not None
    grid = (num_blocks * triton.cdiv(out_features, config.block_n),)
    _grouped_kernel[grid](
        a, weight, out, weights, sorted_pairs, block_experts,
        a_scale if is_fp8 else weights, weight_scale if is_fp8 else weights,  # unread without FP8
        num_pairs, weight.shape[0], num_blocks, out_features, in_features, out_features * weight.stride(1),
        a.stride(0), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0),
        weight_scale.stride(0) if is_fp8 else 0,
        TOP_K=top_k, GATHER_TOKENS=gather_tokens, GATED=gated, MUL_WEIGHT=mul_weight,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        EVEN_K=in_features % config.block_k == 0, PRECISION=_precision(a.dtype), FP8=is_fp8,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def experts_triton(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, config: GroupedConfig | None = None, w13_scale: torch.Tensor | None = None,
                   w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `experts_reference` (engine/kernels/moe/reference.py), through the grouped kernel.

    FP8 experts (`w13_scale`, `w2_scale`) run W8A8, as vLLM's fused_moe does with fp8_w8a8 per-channel weights:
    GEMM 1's input quantized per token and GEMM 2's per pair (`quantize_rows_fp8`, one kernel each), the dots on
    FP8 tensor cores, both scales applied to the float32 accumulator. Dequantizing the weight tile to bf16 in the
    loop instead (W8A16) reads the same weight bytes but spends the tensor cores at bf16 rate and adds a convert
    per weight element to every K step: at decode batches both are bound by the weight read, at prompt sizes the
    FP8 dot does twice the work per cycle. It is also what the FP8 linear layers do at more than one row."""
    _check_operands(hidden, w13, w2, w13_scale, w2_scale)
    is_fp8 = w13_scale is not None
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    out = torch.empty((num_tokens, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    if num_pairs == 0:
        return out
    config = config or grouped_config(num_pairs, w13.shape[0])
    sorted_pairs, block_experts = align_pairs_to_blocks(topk_ids, w13.shape[0], config.block_m)
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty((num_pairs, w2.shape[2]), dtype=hidden.dtype, device=hidden.device)
    a, a_scale = quantize_rows_fp8(hidden) if is_fp8 else (hidden, None)
    grouped_gemm(a, w13, act, weights, sorted_pairs, block_experts, top_k, gather_tokens=True, gated=True,
                 mul_weight=False, config=config, a_scale=a_scale, weight_scale=w13_scale)
    down = torch.empty((num_pairs, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    a, a_scale = quantize_rows_fp8(act) if is_fp8 else (act, None)
    grouped_gemm(a, w2, down, weights, sorted_pairs, block_experts, top_k, gather_tokens=False, gated=False,
                 mul_weight=True, config=config, a_scale=a_scale, weight_scale=w2_scale)
    return torch.sum(down.view(num_tokens, top_k, -1), dim=1, out=out)


def rows_tiles(num_tokens: int, fp8: bool = False) -> RowsTiles:
    """The tiles of `ROWS_TILES` (`ROWS_TILES_FP8` for FP8 weights) for `num_tokens` (the first row whose bound
    covers it, else the last)."""
    table = ROWS_TILES_FP8 if fp8 else ROWS_TILES
    for max_tokens, tiles in table:
        if num_tokens <= max_tokens:
            return tiles
    return table[-1][1]


def _fit(block: int, extent: int) -> int:
    """A power-of-two tile no larger than the extent needs (tiny test shapes)."""
    return max(1, min(block, triton.next_power_of_2(extent)))


def gate_up_rows(hidden: torch.Tensor, w13: torch.Tensor, act: torch.Tensor, ids: torch.Tensor, top_k: int,
                 config: RowsConfig, *, stream_weights: bool = False, use_pdl: bool = False,
                 w13_scale: torch.Tensor | None = None) -> None:
    """GEMM 1 of `experts_rows`: act [T k, I] = SiLU(x w_gate^T) * (x w_up^T), each pair through its expert
    (e4m3 rows times `w13_scale` [E, 2I] for FP8 weights)."""
    intermediate, hidden_size = w13.shape[1] // 2, w13.shape[2]
    block_n, block_k = _fit(config.block_n, intermediate), _fit(config.block_k, hidden_size)
    _gate_up_rows_kernel[(act.shape[0], triton.cdiv(intermediate, block_n))](
        hidden, w13, act, ids, act if w13_scale is None else w13_scale,
        intermediate, hidden_size, intermediate * w13.stride(1),
        hidden.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        0 if w13_scale is None else w13_scale.stride(0),
        TOP_K=top_k, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=hidden_size % block_k == 0,
        STREAM_WEIGHTS=stream_weights, USE_PDL=use_pdl, W_SCALED=w13_scale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(use_pdl),
    )


def down_rows(act: torch.Tensor, w2: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              top_k: int, config: RowsConfig, *, stream_weights: bool = False, use_pdl: bool = False,
              w2_scale: torch.Tensor | None = None) -> None:
    """GEMM 2 of `experts_rows`: out [T, H] = sum over a token's k pairs of weight * (act w_down^T) (e4m3 rows
    times `w2_scale` [E, H] for FP8 weights)."""
    hidden_size, intermediate = w2.shape[1], w2.shape[2]
    block_n, block_k = _fit(config.block_n, hidden_size), _fit(config.block_k, intermediate)
    _down_rows_kernel[(out.shape[0], triton.cdiv(hidden_size, block_n))](
        act, w2, out, ids, weights, weights if w2_scale is None else w2_scale,
        hidden_size, intermediate,
        act.stride(0), w2.stride(0), w2.stride(1), out.stride(0), 0 if w2_scale is None else w2_scale.stride(0),
        TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=intermediate % block_k == 0, STREAM_WEIGHTS=stream_weights, USE_PDL=use_pdl,
        W_SCALED=w2_scale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(use_pdl),
    )


def experts_rows(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, tiles: RowsTiles | None = None, use_pdl: bool = False,
                 w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `experts_reference`: two kernels, GEMM 1 per (pair, features), GEMM 2 per (token,
    features) over the token's k pairs. `use_pdl`: launch both with programmatic dependent launch
    (engine/kernels/launch.py; the caller checked the device). FP8 experts (`w13_scale`, `w2_scale`): W8A16,
    the e4m3 rows read (half the bytes) and widened in registers, the activations as they are, each row's
    scale applied once to its float32 sum."""
    _check_operands(hidden, w13, w2, w13_scale, w2_scale)
    num_tokens, top_k = topk_ids.shape
    out = torch.empty((num_tokens, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return out
    tiles = tiles or rows_tiles(num_tokens, fp8=w13_scale is not None)
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty((num_tokens * top_k, w2.shape[2]), dtype=hidden.dtype, device=hidden.device)
    # One token's k experts are all distinct: no weight row is read twice, so none is worth keeping in L2.
    stream_weights = num_tokens == 1
    gate_up_rows(hidden, w13, act, ids, top_k, tiles.gate_up, stream_weights=stream_weights, use_pdl=use_pdl,
                 w13_scale=w13_scale)
    down_rows(act, w2, out, ids, weights, top_k, tiles.down, stream_weights=stream_weights, use_pdl=use_pdl,
              w2_scale=w2_scale)
    return out
