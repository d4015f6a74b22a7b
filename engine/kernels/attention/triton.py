"""Triton paged attention: the fast path on GPU, matching `ReferenceAttentionBackend` exactly.

Two kernels do the work of a step, plus a small reduction:

* `_write_kv_kernel` scatters the step's new K and V rows to their slots in one launch. In a decode
  step (`write_kv_and_forward`) the attention kernel stores them itself: the program that reads the
  tile holding a sequence's new position writes it first.
* `_paged_attention_kernel` runs one program per (query tile, KV head, KV split). A query tile holds
  `BLOCK_Q` consecutive new tokens of one sequence times all `G = H / KVH` query heads of one KV head,
  flattened into `BLOCK_M = BLOCK_Q * G` rows, so each K/V tile is read once for the whole group
  (GQA) and feeds one matrix product. Decode (query length 1) is the same kernel with one program
  per sequence (no tile search), one live row per head and, when the batch alone cannot fill the
  GPU, the KV range split across programs (flash-decoding); `_combine_splits_kernel` then merges the
  partial softmax states.
  Prefill and chunked prefill use larger query tiles and walk only the KV tiles at or below each
  tile's diagonal, masking causally by absolute position.

Keys are gathered through the block table one position at a time (`BLOCK_N` positions may span several
cache blocks), so tile sizes are independent of the cache's block size. With a sliding window, a
tile's loop starts at the first position its earliest query can see, and every load is masked to the
positions some query of the tile can see: stale table entries (recycled blocks) are never read.
Accumulation is in float32; grids are sized from host metadata only, so there is no device sync.

An FP8 (e4m3) cache takes the `KV_FP8` constexpr branch (the bf16 kernels compile as before): stores
quantize (`quantize_e4m3`), loads convert each K/V tile to the query's dtype (float16 for bfloat16 queries,
which are converted too: one packed conversion a pair on Hopper), and the layer's scales
(a runtime [2] tensor, so CUDA graphs capture a pointer, not a value) are folded in: the K scale into the
score scale, the V scale into the accumulator at the end; exact, since a scale is one number per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.engine.kernels.launch import launch_options
from pagedserve.engine.kernels.fp8_quant import quantize_e4m3
from pagedserve.engine.kernels.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    GroupAttentionMetadata,
    is_fp8_kv_cache,
)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    kv_scales_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_cache_slot,
    stride_cache_h,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # A negative slot marks a padding token (e.g. inside a CUDA graph's fixed batch): nothing to store.
    if slot >= 0:
        offsets = tl.arange(0, BLOCK_HD)
        head = offsets // HEAD_DIM
        dim = offsets % HEAD_DIM
        mask = head < num_kv_heads
        token64 = token.to(tl.int64)
        k = tl.load(key_ptr + token64 * stride_key_t + head * stride_key_h + dim, mask=mask)
        v = tl.load(value_ptr + token64 * stride_value_t + head * stride_value_h + dim, mask=mask)
        cache_offsets = slot * stride_cache_slot + head * stride_cache_h + dim
        if KV_FP8:
            k = quantize_e4m3(k, tl.load(kv_scales_ptr), key_cache_ptr.dtype.element_ty)
            v = quantize_e4m3(v, tl.load(kv_scales_ptr + 1), value_cache_ptr.dtype.element_ty)
        tl.store(key_cache_ptr + cache_offsets, k, mask=mask)
        tl.store(value_cache_ptr + cache_offsets, v, mask=mask)


@triton.jit
def _tanh(x):
    # tanh from exp: exact enough in float32 and needs no libdevice (so it also runs in the interpreter).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _attend_kv_tile(
    kv_tile,
    acc,
    row_max,
    row_sum,
    q,
    q_position,
    row_valid,
    dims,
    dim_valid,
    key_cache_ptr,
    value_cache_ptr,
    table_row,
    head_offset,
    stride_cache_block,
    stride_cache_row,
    kv_begin,
    kv_end,
    score_scale,
    softcap,
    sliding_window,
    BLOCK_N: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_MASKED: tl.constexpr,
    IS_DIM_PADDED: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One online-softmax step over key positions kv_tile * BLOCK_N ... + BLOCK_N - 1.

    With IS_MASKED false the caller guarantees every position is visible to every row of the tile
    (inside the window, at or before the first query, inside the sequence), so nothing is masked.
    With KV_FP8 the tiles are e4m3, converted to the query's dtype (float16 for a bfloat16 model: see the
    kernel); the caller folds in their scales.
    """
    positions = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    if IS_MASKED:
        # Only positions some query of this tile may see are loaded: never a stale or unused block.
        kv_valid = (positions >= kv_begin) & (positions < kv_end)
        block = tl.load(table_row + positions // CACHE_BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
        kv_mask = kv_valid[:, None] & dim_valid[None, :]
    else:
        block = tl.load(table_row + positions // CACHE_BLOCK_SIZE).to(tl.int64)
        kv_mask = dim_valid[None, :]
    row_offsets = block * stride_cache_block + (positions % CACHE_BLOCK_SIZE) * stride_cache_row + head_offset
    key_ptrs = key_cache_ptr + row_offsets[:, None] + dims[None, :]
    if IS_MASKED or IS_DIM_PADDED:
        k = tl.load(key_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(key_ptrs)
    if KV_FP8:
        k = k.to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * score_scale
    if USE_SOFTCAP:
        scores = (softcap * 1.4426950408889634) * _tanh(scores)
    if IS_MASKED:
        allowed = row_valid[:, None] & kv_valid[None, :] & (positions[None, :] <= q_position[:, None])
        if USE_WINDOW:
            allowed = allowed & (positions[None, :] > q_position[:, None] - sliding_window)
        scores = tl.where(allowed, scores, float("-inf"))

    new_max = tl.maximum(row_max, tl.max(scores, 1))
    # A row that has seen no key yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.exp2(scores - safe_max[:, None])
    correction = tl.exp2(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(probs, 1)
    value_ptrs = value_cache_ptr + row_offsets[:, None] + dims[None, :]
    if IS_MASKED or IS_DIM_PADDED:
        v = tl.load(value_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(value_ptrs)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _attend_kv_range(
    tile_lo,
    tile_hi,
    acc,
    row_max,
    row_sum,
    q,
    q_position,
    row_valid,
    dims,
    dim_valid,
    key_cache_ptr,
    value_cache_ptr,
    table_row,
    head_offset,
    stride_cache_block,
    stride_cache_row,
    kv_begin,
    kv_end,
    score_scale,
    softcap,
    sliding_window,
    BLOCK_N: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_MASKED: tl.constexpr,
    IS_DIM_PADDED: tl.constexpr,
    KV_FP8: tl.constexpr,
    LOOP_AS_WHILE: tl.constexpr,
):
    """_attend_kv_tile over tiles tile_lo ... tile_hi - 1."""
    if LOOP_AS_WHILE:
        # Older Triton interpreters cannot use a loaded scalar as a `range` bound; `while` works there
        # but would not be software-pipelined when compiled, so compiled kernels keep the `for`.
        kv_tile = tile_lo
        while kv_tile < tile_hi:
            acc, row_max, row_sum = _attend_kv_tile(
                kv_tile, acc, row_max, row_sum, q, q_position, row_valid, dims, dim_valid,
                key_cache_ptr, value_cache_ptr, table_row, head_offset, stride_cache_block, stride_cache_row,
                kv_begin, kv_end, score_scale, softcap, sliding_window,
                BLOCK_N, CACHE_BLOCK_SIZE, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, IS_MASKED, IS_DIM_PADDED,
                KV_FP8,
            )
            kv_tile += 1
    else:
        for kv_tile in range(tile_lo, tile_hi):
            acc, row_max, row_sum = _attend_kv_tile(
                kv_tile, acc, row_max, row_sum, q, q_position, row_valid, dims, dim_valid,
                key_cache_ptr, value_cache_ptr, table_row, head_offset, stride_cache_block, stride_cache_row,
                kv_begin, kv_end, score_scale, softcap, sliding_window,
                BLOCK_N, CACHE_BLOCK_SIZE, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, IS_MASKED, IS_DIM_PADDED,
                KV_FP8,
            )
    return acc, row_max, row_sum


# Triton compiles a variant of a kernel for each pattern of its integer arguments (equal to 1, multiple of
# 16); the batch's sequence count and block-table width change from step to step, and a new pattern met
# mid-run would compile (seconds) inside a step. Left unspecialized, they never do.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt_seq"])
def _paged_attention_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    new_key_ptr,
    new_value_ptr,
    slot_mapping_ptr,
    kv_scales_ptr,
    num_seqs,
    scale,
    softcap,
    sliding_window,
    stride_q_t,
    stride_q_h,
    stride_cache_block,
    stride_cache_row,
    stride_cache_h,
    stride_bt_seq,
    stride_o_t,
    stride_o_h,
    stride_p_t,
    stride_p_h,
    stride_p_split,
    stride_new_k_t,
    stride_new_k_h,
    stride_new_v_t,
    stride_new_v_h,
    num_splits,
    GROUP_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SPLITS: tl.constexpr,
    IS_DECODE: tl.constexpr,
    WRITE_NEW_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LOOP_AS_WHILE: tl.constexpr,
    USE_PDL: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    if USE_PDL:  # launched early (engine/kernels/launch.py): wait for the kernel before, first thing
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    IS_DIM_PADDED: tl.constexpr = BLOCK_D != HEAD_DIM
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if IS_DECODE:
        # One new token per sequence (query_start_loc[b] == b): program b is sequence b, no search.
        seq = tl.program_id(0)
        query_start = seq
        query_len = 1
        first_q = 0
    else:
        # Launch the last query tiles first: under causal masking they have the most keys, and starting
        # the longest programs first shortens the tail of a long prefill.
        tile_index = tl.num_programs(0) - 1 - tl.program_id(0)
        # Which sequence owns this tile: sequence b owns virtual tiles starting at
        # query_start_loc[b] // BLOCK_Q + b (always at least ceil(query_len / BLOCK_Q) of them, the spare
        # ones exit below). Binary search for the last b whose start is <= tile_index.
        lo = tile_index * 0  # int32 scalars: loop-carried types must not change across iterations
        hi = lo + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            mid_start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            if mid_start <= tile_index:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        query_start = tl.load(query_start_loc_ptr + seq)
        query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
        first_q = (tile_index - (query_start // BLOCK_Q + seq)) * BLOCK_Q  # first new token of the tile
        if first_q >= query_len:
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_before = seq_len - query_len  # position of the sequence's first new token

    rows = tl.arange(0, BLOCK_M)
    q_offset = first_q + rows // GROUP_SIZE
    head = kv_head * GROUP_SIZE + rows % GROUP_SIZE
    row_valid = (rows < BLOCK_Q * GROUP_SIZE) & (q_offset < query_len)
    q_position = context_before + q_offset
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    token = (query_start + q_offset).to(tl.int64)
    q = tl.load(
        query_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if KV_FP8 and q.dtype == tl.bfloat16:
        # Both dots of an FP8 cache's tiles run in float16: on Hopper e4m3 widens to float16 in one packed
        # conversion a pair of values, to bfloat16 only through float16 and float32 (five conversions a pair).
        # float16 also keeps more of q's mantissa; attention queries are far inside its range.
        q = q.to(tl.float16)

    # Key positions this tile can see: up to its last query (causal), from its first query's window.
    last_q_position = context_before + tl.minimum(first_q + BLOCK_Q, query_len) - 1
    kv_end = last_q_position + 1
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(context_before + first_q - sliding_window + 1, 0)
    tile_begin = kv_begin // BLOCK_N
    tile_end = tl.cdiv(kv_end, BLOCK_N)
    if USE_SPLITS:
        tiles_per_split = tl.cdiv(tile_end - tile_begin, num_splits)
        tile_begin = tile_begin + split * tiles_per_split
        tile_end = tl.minimum(tile_begin + tiles_per_split, tile_end)

    if USE_SOFTCAP:
        score_scale = scale / softcap
    else:
        score_scale = scale * 1.4426950408889634  # fold log2(e) so the softmax uses exp2
    if KV_FP8:
        score_scale = score_scale * tl.load(kv_scales_ptr)  # q.(s k) = s (q.k): the K scale, once

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_offset = kv_head * stride_cache_h

    if WRITE_NEW_KV:
        # Decode: the sequence's one new key/value (position seq_len - 1) is stored here by the program
        # whose tiles hold that position, before it reads them; no other program reads it. A negative
        # slot is a padding row (nothing to store).
        last_tile = (seq_len - 1) // BLOCK_N
        if (last_tile >= tile_begin) & (last_tile < tile_end):
            slot = tl.load(slot_mapping_ptr + query_start).to(tl.int64)
            if slot >= 0:
                new_offsets = (slot // CACHE_BLOCK_SIZE) * stride_cache_block + (slot % CACHE_BLOCK_SIZE) * stride_cache_row
                new_k = tl.load(new_key_ptr + query_start.to(tl.int64) * stride_new_k_t + kv_head * stride_new_k_h + dims,
                                mask=dim_valid)
                new_v = tl.load(new_value_ptr + query_start.to(tl.int64) * stride_new_v_t + kv_head * stride_new_v_h
                                + dims, mask=dim_valid)
                if KV_FP8:
                    new_k = quantize_e4m3(new_k, tl.load(kv_scales_ptr), key_cache_ptr.dtype.element_ty)
                    new_v = quantize_e4m3(new_v, tl.load(kv_scales_ptr + 1), value_cache_ptr.dtype.element_ty)
                tl.store(key_cache_ptr + new_offsets + head_offset + dims, new_k, mask=dim_valid)
                tl.store(value_cache_ptr + new_offsets + head_offset + dims, new_v, mask=dim_valid)
        tl.debug_barrier()  # the stores are seen by every thread of the program before its tile loads

    # Tiles every row of this tile sees whole (inside all windows, at or before the first query) need
    # no masking; only the tiles at the window's edge and on the diagonal do. Three runs, in order.
    first_q_position = context_before + first_q
    full_begin = 0
    if USE_WINDOW:
        full_begin = tl.cdiv(tl.maximum(last_q_position - sliding_window + 1, 0), BLOCK_N)
    full_end = (first_q_position + 1) // BLOCK_N
    masked_head_end = tl.minimum(tl.maximum(full_begin, tile_begin), tile_end)
    unmasked_end = tl.maximum(tl.minimum(full_end, tile_end), masked_head_end)
    acc, row_max, row_sum = _attend_kv_range(
        tile_begin, masked_head_end, acc, row_max, row_sum, q, q_position, row_valid, dims, dim_valid,
        key_cache_ptr, value_cache_ptr, table_row, head_offset, stride_cache_block, stride_cache_row,
        kv_begin, kv_end, score_scale, softcap, sliding_window,
        BLOCK_N, CACHE_BLOCK_SIZE, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION,
        True, IS_DIM_PADDED, KV_FP8, LOOP_AS_WHILE,
    )
    acc, row_max, row_sum = _attend_kv_range(
        masked_head_end, unmasked_end, acc, row_max, row_sum, q, q_position, row_valid, dims, dim_valid,
        key_cache_ptr, value_cache_ptr, table_row, head_offset, stride_cache_block, stride_cache_row,
        kv_begin, kv_end, score_scale, softcap, sliding_window,
        BLOCK_N, CACHE_BLOCK_SIZE, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION,
        False, IS_DIM_PADDED, KV_FP8, LOOP_AS_WHILE,
    )
    acc, row_max, row_sum = _attend_kv_range(
        unmasked_end, tile_end, acc, row_max, row_sum, q, q_position, row_valid, dims, dim_valid,
        key_cache_ptr, value_cache_ptr, table_row, head_offset, stride_cache_block, stride_cache_row,
        kv_begin, kv_end, score_scale, softcap, sliding_window,
        BLOCK_N, CACHE_BLOCK_SIZE, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION,
        True, IS_DIM_PADDED, KV_FP8, LOOP_AS_WHILE,
    )
    if KV_FP8:
        acc = acc * tl.load(kv_scales_ptr + 1)  # sum p (s v) = s (sum p v): the V scale, once (splits too)

    if USE_SPLITS:
        partial_rows = token * stride_p_t + head * stride_p_h + split * stride_p_split
        tl.store(partial_max_ptr + partial_rows, row_max, mask=row_valid)
        tl.store(partial_sum_ptr + partial_rows, row_sum, mask=row_valid)
        tl.store(
            partial_out_ptr + partial_rows[:, None] * BLOCK_D + dims[None, :],
            acc,
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        # Every valid row sees at least its own key, so row_sum > 0; padded rows divide by 1, not 0.
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )


@triton.jit
def _combine_splits_kernel(
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    out_ptr,
    num_heads,
    num_splits,
    stride_o_t,
    stride_o_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_valid = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    base = (token * num_heads + head) * num_splits + splits
    split_max = tl.load(partial_max_ptr + base, mask=split_valid, other=float("-inf"))
    split_sum = tl.load(partial_sum_ptr + base, mask=split_valid, other=0.0)
    global_max = tl.max(split_max, 0)  # finite for a real query: some split saw the query's own key
    weights = tl.where(split_max == float("-inf"), 0.0, tl.exp2(split_max - global_max))
    total = tl.sum(split_sum * weights, 0)
    total = tl.where(total == 0.0, 1.0, total)  # a padding row (empty context) comes out 0, not NaN
    partial = tl.load(
        partial_out_ptr + base[:, None] * BLOCK_D + dims[None, :], mask=split_valid[:, None], other=0.0
    )
    out = tl.sum(partial * weights[:, None], 0) / total
    tl.store(
        out_ptr + token * stride_o_t + head * stride_o_h + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of `_paged_attention_kernel`."""

    block_m: int  # rows per program: query tokens x the query heads of one KV head (>= 16)
    block_n: int  # key positions per inner-loop step (any power of two >= 16, independent of block size)
    num_warps: int
    num_stages: int


def default_decode_config(block_d: int, group_size: int, split_kv: bool = False, kv_fp8: bool = False) -> TileConfig:
    """One token per sequence: a tile is one head group, 16 rows being tl.dot's minimum. Small batches,
    whose KV ranges are split across programs, take 32-key tiles: twice the programs over a short context
    (faster at every context length in `attention_bench.py --batch1`, most at short ones: docs/kernels.md).
    An FP8 cache's unsplit tiles run on 2 warps: its half-size tiles leave 4 warps waiting on each other
    (19-23% faster at 256 and 512 sequences in `attention_bench.py --sweep --kv-cache-dtype fp8`; bf16 equal)."""
    num_warps = 2 if kv_fp8 and not split_kv else 4
    return TileConfig(block_m=16, block_n=64 if block_d <= 128 and not split_kv else 32, num_warps=num_warps,
                      num_stages=3)


def default_prefill_config(block_d: int, group_size: int) -> TileConfig:
    if block_d <= 64:
        return TileConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if block_d <= 128:  # the tile sweep in docs/kernels.md: 8 warps or 128 rows ran slower
        return TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return TileConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


# Whether TRITON_INTERPRET=1 was set when the kernels were defined (a property of the kernel objects).
_IS_INTERPRETED = type(_paged_attention_kernel).__name__ == "InterpretedFunction"


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton kernels; owns no state beyond launch settings.

    `num_kv_splits` forces the flash-decoding split count (tests use it to cover the split path on
    small batches); `None` picks it from the batch shape and the GPU's multiprocessor count.
    `decode_config` / `prefill_config` override the tile shapes (the benchmark sweeps them).
    `programmatic_launch`: launch with PDL (engine/kernels/launch.py); the owner checked the device.
    """

    name = "triton"
    supports_cuda_graphs = True

    def __init__(
        self,
        num_kv_splits: int | None = None,
        decode_config: TileConfig | None = None,
        prefill_config: TileConfig | None = None,
        programmatic_launch: bool = False,
    ) -> None:
        if num_kv_splits is not None and num_kv_splits < 1:
            raise ValueError(f"num_kv_splits must be >= 1 or None, got {num_kv_splits}")
        self.num_kv_splits = num_kv_splits
        self.decode_config = decode_config
        self.prefill_config = prefill_config
        self.programmatic_launch = programmatic_launch
        self._num_sms_by_device: dict[int, int] = {}

    @classmethod
    def is_available(cls, device: torch.device) -> tuple[bool, str]:
        if device.type == "cuda":
            return True, ""
        return False, f"Triton kernels need a CUDA device, got {device} (TRITON_INTERPRET=1 runs them on CPU, slowly)"

    def write_kv(
        self,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        num_tokens, num_kv_heads, head_dim = key.shape
        if num_tokens == 0:
            return
        _check_cache(key_cache, value_cache)
        _check_new_kv(key, value)
        kv_fp8 = is_fp8_kv_cache(key_cache)
        _write_kv_kernel[(num_tokens,)](
            key,
            value,
            key_cache,
            value_cache,
            slot_mapping,
            _scales_or_placeholder(kv_scales, kv_fp8, slot_mapping),
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            key_cache.stride(1),
            key_cache.stride(2),
            num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_HD=triton.next_power_of_2(num_kv_heads * head_dim),
            KV_FP8=kv_fp8,
        )

    def forward(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._attend(query, key_cache, value_cache, metadata, group, scale, sliding_window, softcap, None,
                            kv_scales)

    def write_kv_and_forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode steps store the new keys and values inside the attention kernel (one launch a layer
        fewer); other steps write, then attend."""
        if not metadata.is_decode_only:
            return super().write_kv_and_forward(query, key, value, key_cache, value_cache, metadata, group,
                                                scale=scale, sliding_window=sliding_window, softcap=softcap,
                                                kv_scales=kv_scales)
        _check_new_kv(key, value)
        return self._attend(query, key_cache, value_cache, metadata, group, scale, sliding_window, softcap,
                            (key, value), kv_scales)

    def _attend(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = key_cache.shape[2]
        _check_cache(key_cache, value_cache)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
        if query.stride(2) != 1:
            raise ValueError("query needs a contiguous last (head_dim) dimension")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        out = self._empty((num_tokens, num_heads, head_dim), query.dtype, query.device)
        num_seqs = metadata.num_seqs
        if num_tokens == 0 or num_seqs == 0:
            return out

        group_size = num_heads // num_kv_heads
        block_d = max(16, triton.next_power_of_2(head_dim))
        is_decode = metadata.max_query_len == 1
        # Decode launches one program per sequence (and KV head, and split), splitting the KV range when
        # the batch alone cannot fill the GPU; other steps launch the tile bound, whose spare tiles exit.
        if is_decode:
            num_splits = self._choose_num_splits(query.device, num_seqs * num_kv_heads, metadata.max_seq_len, True)
            config = self.decode_config or default_decode_config(block_d, group_size, split_kv=num_splits > 1,
                                                                 kv_fp8=is_fp8_kv_cache(key_cache))
        else:
            config = self.prefill_config or default_prefill_config(block_d, group_size)
        block_m = max(config.block_m, 16, triton.next_power_of_2(group_size))
        block_n = config.block_n
        num_warps, num_stages = config.num_warps, config.num_stages
        block_q = max(1, block_m // group_size)
        num_tiles_bound = num_tokens // block_q + num_seqs
        if not is_decode:
            num_splits = self._choose_num_splits(query.device, num_tiles_bound * num_kv_heads, metadata.max_seq_len, False)
        use_splits = num_splits > 1
        if use_splits:
            partial_out = self._empty((num_tokens, num_heads, num_splits, block_d), torch.float32, query.device)
            partial_max = self._empty((num_tokens, num_heads, num_splits), torch.float32, query.device)
            partial_sum = self._empty((num_tokens, num_heads, num_splits), torch.float32, query.device)
        else:
            partial_out = partial_max = partial_sum = out  # unused placeholders
        new_key, new_value = new_kv if new_kv is not None else (query, query)  # placeholders when unused
        kv_fp8 = is_fp8_kv_cache(key_cache)
        use_pdl = self.programmatic_launch
        block_tables = group.block_tables
        _paged_attention_kernel[(num_seqs if is_decode else num_tiles_bound, num_kv_heads, num_splits)](
            query,
            key_cache,
            value_cache,
            block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            out,
            partial_out,
            partial_max,
            partial_sum,
            new_key,
            new_value,
            group.slot_mapping,
            _scales_or_placeholder(kv_scales, kv_fp8, out),
            num_seqs,
            float(scale),
            float(softcap) if softcap is not None else 1.0,
            int(sliding_window) if sliding_window is not None else 0,
            query.stride(0),
            query.stride(1),
            key_cache.stride(0),
            key_cache.stride(1),
            key_cache.stride(2),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            num_heads * num_splits if use_splits else 0,
            num_splits if use_splits else 0,
            1,
            new_key.stride(0),
            new_key.stride(1),
            new_value.stride(0),
            new_value.stride(1),
            num_splits,
            GROUP_SIZE=group_size,
            BLOCK_Q=block_q,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            CACHE_BLOCK_SIZE=metadata.block_size,
            USE_SOFTCAP=softcap is not None,
            USE_WINDOW=sliding_window is not None,
            USE_SPLITS=use_splits,
            IS_DECODE=is_decode,
            WRITE_NEW_KV=new_kv is not None,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            LOOP_AS_WHILE=_IS_INTERPRETED,
            USE_PDL=use_pdl,
            KV_FP8=kv_fp8,
            num_warps=num_warps,
            num_stages=num_stages,
            **launch_options(use_pdl),
        )
        if use_splits:
            _combine_splits_kernel[(num_tokens, num_heads)](
                partial_out,
                partial_max,
                partial_sum,
                out,
                num_heads,
                num_splits,
                out.stride(0),
                out.stride(1),
                HEAD_DIM=head_dim,
                BLOCK_D=block_d,
                BLOCK_S=triton.next_power_of_2(num_splits),
                USE_PDL=use_pdl,
                num_warps=4,
                **launch_options(use_pdl),
            )
        return out

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Every buffer the kernels write; tests override it to poison them and prove full coverage."""
        return torch.empty(shape, dtype=dtype, device=device)

    def _choose_num_splits(self, device: torch.device, num_programs: int, max_seq_len: int, is_decode: bool) -> int:
        """Split the KV range only when the unsplit grid cannot fill the GPU (small decode batches)."""
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        if not is_decode or device.type != "cuda":
            return 1
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms_by_device:
            self._num_sms_by_device[index] = torch.cuda.get_device_properties(index).multi_processor_count
        target_programs = 2 * self._num_sms_by_device[index]
        if num_programs >= target_programs:
            return 1
        # Keep at least ~256 keys per split so the merge stays cheap next to the reads.
        max_useful = max(1, max_seq_len // 256)
        return max(1, min(math.ceil(target_programs / num_programs), max_useful, 32))


def _scales_or_placeholder(kv_scales: torch.Tensor | None, kv_fp8: bool, placeholder: torch.Tensor) -> torch.Tensor:
    """The [2] float32 (k_scale, v_scale) an FP8 cache's kernels read (ones when None: tests; the engine passes
    its per-layer tensor); any tensor otherwise, as the pointer the bf16 kernels never read."""
    if not kv_fp8:
        return placeholder
    if kv_scales is None:
        return torch.ones(2, dtype=torch.float32, device=placeholder.device)
    if kv_scales.dtype != torch.float32 or kv_scales.numel() != 2 or not kv_scales.is_contiguous():
        raise ValueError(f"kv_scales must be a contiguous [2] float32 tensor (k_scale, v_scale), got "
                         f"{kv_scales.dtype} of shape {tuple(kv_scales.shape)}")
    return kv_scales


def _check_new_kv(key: torch.Tensor, value: torch.Tensor) -> None:
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key and value need a contiguous last (head_dim) dimension")


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if (key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride()
            or key_cache.dtype != value_cache.dtype):
        raise ValueError(
            f"key and value caches must share shape, strides and dtype, got {tuple(key_cache.shape)}/"
            f"{key_cache.stride()}/{key_cache.dtype} and {tuple(value_cache.shape)}/{value_cache.stride()}/"
            f"{value_cache.dtype}"
        )
    if key_cache.stride(3) != 1:
        raise ValueError("caches need a contiguous last (head_dim) dimension")
