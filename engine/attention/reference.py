"""Pure-PyTorch paged attention: the oracle every other backend must match; runs on CPU and GPU.

It gathers each sequence's context out of the paged cache into a padded `[B, KVH, L, D]` tensor and
runs one masked, batched attention. Simple and exact rather than fast; the Triton backend is the fast
path on GPU.
"""

from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionMetadata, GroupAttentionMetadata


class ReferenceAttentionBackend(AttentionBackend):
    name = "reference"

    def write_kv(
        self,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        num_blocks, block_size = key_cache.shape[:2]
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
    ) -> torch.Tensor:
        device = query.device
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = key_cache.shape[2]
        block_size = metadata.block_size
        query_lens = metadata.query_lens_cpu
        seq_lens = metadata.seq_lens_cpu
        num_seqs = len(seq_lens)
        max_q = max(query_lens)

        # Only the last `window + max_q - 1` positions can be attended to; gather no more than that.
        max_context = max(seq_lens)
        if sliding_window is not None:
            max_context = min(max_context, sliding_window + max_q - 1)
        seq_lens_t = torch.tensor(seq_lens, device=device, dtype=torch.long)
        query_lens_t = torch.tensor(query_lens, device=device, dtype=torch.long)
        first_pos = (seq_lens_t - max_context).clamp(min=0)  # [B] first gathered position
        positions = first_pos[:, None] + torch.arange(max_context, device=device)[None, :]  # [B, L]
        valid_kv = positions < seq_lens_t[:, None]
        positions = torch.where(valid_kv, positions, torch.zeros_like(positions))
        block_tables = group.block_tables.long()
        blocks = torch.gather(block_tables, 1, positions // block_size)
        slots = blocks * block_size + positions % block_size  # [B, L]
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        keys = flat_k[slots].permute(0, 2, 1, 3)  # [B, KVH, L, D]
        values = flat_v[slots].permute(0, 2, 1, 3)

        # Pad the packed queries to [B, H, max_q, D].
        starts = metadata.query_start_loc.long()[:-1]
        q_offsets = torch.arange(max_q, device=device)
        valid_q = q_offsets[None, :] < query_lens_t[:, None]  # [B, max_q]
        token_index = torch.where(valid_q, starts[:, None] + q_offsets[None, :], torch.zeros_like(valid_q, dtype=torch.long))
        queries = query[token_index].permute(0, 2, 1, 3)  # [B, H, max_q, D]
        q_positions = (seq_lens_t - query_lens_t)[:, None] + q_offsets[None, :]  # [B, max_q]

        group_size = num_heads // num_kv_heads
        queries = queries.reshape(num_seqs, num_kv_heads, group_size * max_q, head_dim)
        scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale  # [B, KVH, G*max_q, L]
        scores = scores.view(num_seqs, num_kv_heads, group_size, max_q, max_context)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        allowed = valid_kv[:, None, :] & (positions[:, None, :] <= q_positions[:, :, None])  # [B, max_q, L]
        if sliding_window is not None:
            allowed &= positions[:, None, :] > q_positions[:, :, None] - sliding_window
        scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # padded query rows see no key at all
        probs = probs.view(num_seqs, num_kv_heads, group_size * max_q, max_context)
        out = torch.matmul(probs.to(values.dtype), values)  # [B, KVH, G*max_q, D]
        out = out.view(num_seqs, num_heads, max_q, head_dim).permute(0, 2, 1, 3)  # [B, max_q, H, D]
        return out[valid_q].to(query.dtype)  # [T, H, D], packed back in order
