"""Pure-PyTorch paged attention: the oracle every other backend must match; runs on CPU and GPU.

A step is split by query length, so no query is padded to the step's longest one:

- decode rows (query length 1) run as one batched attention: each row gathers its own context (at most
  the sliding window) into `[KVH, B, L, D]`, padded only on the key side up to the longest such context;
  the `G = H / KVH` query heads of a KV head stand in the query axis, so GQA needs no expanded K/V;
- prefill and chunked-prefill rows (query length > 1) run one sequence at a time, each over exactly the
  positions its queries can see.

Every gathered position lies inside the sequence and inside the window of some query of it (key padding
repeats the row's last position and is masked out), so stale block-table entries and table padding are
never read. An FP8 cache is quantized on write (`quantize_kv`) and dequantized on every read
(`dequantize_kv`: `stored.float() * scale`), the semantics engine/kernels/attention/base.py states. All math
is float32; without softcap it is `scaled_dot_product_attention` with a boolean
mask, with softcap the explicit `softcap * tanh(q.k * scale / softcap)` then a float32 softmax. The Triton
backend is the fast path on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.engine.kernels.attention.base import (
    FP8_KV_DTYPE,
    FP8_KV_MAX,
    AttentionBackend,
    AttentionMetadata,
    GroupAttentionMetadata,
    is_fp8_kv_cache,
)


def quantize_kv(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`values / scale` in float32, clamped to +-448 and rounded to the nearest e4m3 value (ties to even)."""
    values = values.float()
    if scale is not None:
        values = values / scale
    return values.clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 values of cache entries: `stored * scale` for FP8, the values themselves otherwise."""
    values = stored.float()
    if scale is not None and stored.dtype == FP8_KV_DTYPE:
        values = values * scale
    return values


def _attend(
    query: torch.Tensor,  # [..., M, D] float32
    key: torch.Tensor,  # [..., L, D] float32, batch dims equal to the query's or 1
    value: torch.Tensor,  # [..., L, D] float32, batch dims as `key`
    allowed: torch.Tensor,  # bool, broadcastable to [..., M, L]; every query row allows at least one key
    scale: float,
    softcap: float | None,
) -> torch.Tensor:  # [..., M, D] float32
    if softcap is None:
        # Batch dims of size 1 in `key` are broadcast by stride-0 views, which the fused CPU kernel takes.
        batch_shape = query.shape[:-2]
        key = key.expand(*batch_shape, *key.shape[-2:])
        value = value.expand(*batch_shape, *value.shape[-2:])
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale)
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
    scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    scores.masked_fill_(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), value)


class ReferenceAttentionBackend(AttentionBackend):
    name = "reference"

    def write_kv(
        self,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        num_blocks, block_size = key_cache.shape[:2]
        if is_fp8_kv_cache(key_cache):
            k_scale, v_scale = (None, None) if kv_scales is None else (kv_scales[0], kv_scales[1])
            # index_copy_ has no float8 kernel on CPU: the bytes are copied as uint8.
            key, value = quantize_kv(key, k_scale).view(torch.uint8), quantize_kv(value, v_scale).view(torch.uint8)
            key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
        key_cache.view(num_blocks * block_size, *key_cache.shape[2:]).index_copy_(0, slot_mapping, key)
        value_cache.view(num_blocks * block_size, *value_cache.shape[2:]).index_copy_(0, slot_mapping, value)

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
        num_tokens, num_heads, head_dim = query.shape
        k_scale, v_scale = (None, None) if kv_scales is None else (kv_scales[0], kv_scales[1])
        num_kv_heads = key_cache.shape[2]
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        query_dtype = query.dtype
        query = query.float().contiguous()  # the model hands over a transposed view
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=query.device)

        decode_rows: list[int] = []
        decode_tokens: list[int] = []
        start = 0
        for row, query_len in enumerate(metadata.query_lens_cpu):
            if query_len == 1:
                decode_rows.append(row)
                decode_tokens.append(start)
            elif query_len > 1:
                end = start + query_len
                out[start:end] = self._prefill_row(
                    query[start:end], flat_k, flat_v, group.block_tables[row], metadata.seq_lens_cpu[row],
                    metadata.block_size, scale, sliding_window, softcap, k_scale, v_scale,
                )
            start += query_len
        if decode_rows:
            rows_out = self._decode_rows(
                query, flat_k, flat_v, metadata, group, decode_rows, decode_tokens, scale, sliding_window, softcap,
                k_scale, v_scale,
            )
            if len(decode_tokens) == num_tokens:
                out = rows_out
            else:
                out[torch.tensor(decode_tokens, device=query.device)] = rows_out
        return out.to(query_dtype)

    def _decode_rows(
        self,
        query: torch.Tensor,  # [T, H, D] float32
        flat_k: torch.Tensor,  # [slots, KVH, D]
        flat_v: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        rows: list[int],
        tokens: list[int],
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        k_scale: torch.Tensor | None,
        v_scale: torch.Tensor | None,
    ) -> torch.Tensor:  # [len(rows), H, D] float32
        """One query per row at position `seq_len - 1`: it sees the last `min(seq_len, window)` positions."""
        device = query.device
        num_kv_heads, head_dim = flat_k.shape[1:]
        num_heads = query.shape[1]
        seq_lens = [metadata.seq_lens_cpu[row] for row in rows]
        context_lens = seq_lens if sliding_window is None else [min(n, sliding_window) for n in seq_lens]
        max_context = max(context_lens)
        seq_lens_t = torch.tensor(seq_lens, device=device)
        context_lens_t = torch.tensor(context_lens, device=device)
        offsets = torch.arange(max_context, device=device)
        allowed = offsets[None, :] < context_lens_t[:, None]  # [B, L]
        # Key padding repeats the last position (the query's own token), which is always live.
        first_positions = seq_lens_t - context_lens_t
        positions = torch.minimum(first_positions[:, None] + offsets[None, :], (seq_lens_t - 1)[:, None])
        block_size = metadata.block_size
        tables = group.block_tables if len(rows) == metadata.num_seqs else group.block_tables[rows]
        slots = torch.gather(tables.long(), 1, positions // block_size) * block_size + positions % block_size
        # Gather along the cache's contiguous slot axis, then lay the (small) result out KV-head-major,
        # [KVH, B, L, D], contiguous for the fused kernel. index_select over the cache viewed [KVH, slots, D]
        # would give that layout directly, but on CPU it costs time in proportion to the whole cache, not to
        # the rows gathered (45 ms a call at 262k slots, 360 ms at 2M: decoding crawled on a large cache).
        gathered_shape = (len(rows), max_context, num_kv_heads, head_dim)
        keys = flat_k.index_select(0, slots.flatten()).view(gathered_shape).permute(2, 0, 1, 3).contiguous()
        values = flat_v.index_select(0, slots.flatten()).view(gathered_shape).permute(2, 0, 1, 3).contiguous()
        if len(tokens) == query.shape[0]:
            rows_query = query
        else:
            rows_query = query.index_select(0, torch.tensor(tokens, device=device))
        # The G query heads of a KV head share its keys and mask: they stand in the query axis.
        rows_query = rows_query.view(len(rows), num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)
        keys, values = dequantize_kv(keys, k_scale), dequantize_kv(values, v_scale)
        out = _attend(rows_query, keys, values, allowed[None, :, None, :], scale, softcap)
        out = out.transpose(0, 1)  # [B, KVH, G, D]
        return out.reshape(len(rows), num_heads, head_dim)

    def _prefill_row(
        self,
        query: torch.Tensor,  # [Q, H, D] float32: this row's new tokens
        flat_k: torch.Tensor,  # [slots, KVH, D]
        flat_v: torch.Tensor,
        block_table: torch.Tensor,  # [max_blocks] int32
        seq_len: int,
        block_size: int,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        k_scale: torch.Tensor | None,
        v_scale: torch.Tensor | None,
    ) -> torch.Tensor:  # [Q, H, D] float32
        """Queries at positions `seq_len - Q ... seq_len - 1` over every position any of them can see."""
        device = query.device
        query_len, num_heads, head_dim = query.shape
        num_kv_heads = flat_k.shape[1]
        group_size = num_heads // num_kv_heads
        first_query = seq_len - query_len
        first_key = 0 if sliding_window is None else max(0, first_query - sliding_window + 1)
        key_positions = torch.arange(first_key, seq_len, device=device)
        query_positions = torch.arange(first_query, seq_len, device=device)
        allowed = key_positions[None, :] <= query_positions[:, None]  # [Q, L]
        if sliding_window is not None:
            allowed &= key_positions[None, :] > query_positions[:, None] - sliding_window
        slots = block_table.long()[key_positions // block_size] * block_size + key_positions % block_size
        keys = dequantize_kv(flat_k.index_select(0, slots).transpose(0, 1), k_scale)  # [KVH, L, D]
        values = dequantize_kv(flat_v.index_select(0, slots).transpose(0, 1), v_scale)
        # [Q, H, D] -> [KVH, G, Q, D] against keys [KVH, 1, L, D]: a KV head's G query heads share its keys.
        grouped_query = query.view(query_len, num_kv_heads, group_size, head_dim).permute(1, 2, 0, 3)
        out = _attend(grouped_query, keys[:, None], values[:, None], allowed, scale, softcap)  # [KVH, G, Q, D]
        return out.permute(2, 0, 1, 3).reshape(query_len, num_heads, head_dim)
