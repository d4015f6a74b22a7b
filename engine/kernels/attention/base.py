"""The seam between the engine and its attention kernels.

One step runs one packed batch: `T` new query tokens from `B` sequences laid end to end, described by
explicit metadata (no module globals). Sequence `b` owns query tokens
`query_start_loc[b]:query_start_loc[b+1]`; after this step its context is `seq_lens[b]` tokens long,
so its new tokens sit at positions `seq_lens[b] - query_len[b] ... seq_lens[b] - 1`.

KV-cache layout, per layer: `key_cache` and `value_cache` of shape
`[num_blocks, block_size, num_kv_heads, head_dim]`, in the model's dtype or in FP8 (`torch.float8_e4m3fn`,
`kv_cache_dtype="fp8"`). An FP8 cache stores `value / scale` clamped to +-448 (e4m3's largest finite value)
and rounded to nearest even, and is read as `stored * scale`, with one float32 scale per layer for K and one
for V (`kv_scales`, a [2] tensor on the cache's device, so CUDA graphs read whatever it holds at replay);
None reads as 1.0. Attention over an FP8 cache is the attention over its dequantized values.

Token at position `p` of sequence `b` lives in block `block_tables[b, p // block_size]`, row
`p % block_size`; `slot_mapping[t]` is the flat slot (`block * block_size + row`) where new token `t` is
written. For sliding-window layers, table entries of blocks that fell out of the window are stale (the
allocator recycled them) and must not be read: a backend reads only positions inside the window.

Semantics every backend matches (the reference backend is the oracle): query at position `q` attends
to keys at positions `k` with `k <= q` and, with a sliding window `W`, `k > q - W`; scores are
`q.k * scale`, soft-capped as `softcap * tanh(score / softcap)` when `softcap` is set, then a softmax
in float32. Grouped-query attention maps query head `h` to KV head `h // (H / KVH)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # the largest finite e4m3fn value: quantized values are clamped to +-FP8_KV_MAX


def is_fp8_kv_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


@dataclass
class GroupAttentionMetadata:
    """Block addressing of one layer group (layers that share a block pool)."""

    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, on device
    slot_mapping: torch.Tensor  # [T] int64, on device


@dataclass
class AttentionMetadata:
    """Everything a backend needs about the packed batch of one step."""

    query_start_loc: torch.Tensor  # [B + 1] int32, on device (cu_seqlens_q)
    seq_lens: torch.Tensor  # [B] int32, on device: context length after this step
    max_query_len: int
    max_seq_len: int
    block_size: int
    groups: list[GroupAttentionMetadata]
    # Host copies, so that backends that loop or size buffers need no device sync.
    query_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and computes attention for the packed queries."""

    name: str = "abstract"
    # True when every per-step value reaches the kernels through device tensors (host values only size
    # grids), so that a decode step can be captured in a CUDA graph and replayed with new inputs.
    supports_cuda_graphs: bool = False

    @abstractmethod
    def write_kv(
        self,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        key: torch.Tensor,  # [T, KVH, D]
        value: torch.Tensor,  # [T, KVH, D]
        slot_mapping: torch.Tensor,  # [T] int64
        kv_scales: torch.Tensor | None = None,  # [2] float32 (k_scale, v_scale): read for an FP8 cache only
    ) -> None:
        """Store the step's new keys and values at their slots (quantized, for an FP8 cache)."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, H, D]
        """Attention of every query token over its sequence's cached context (new tokens included)."""

    def write_kv_and_forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,  # [T, KVH, D]
        value: torch.Tensor,  # [T, KVH, D]
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, H, D]
        """`write_kv` then `forward`, what a layer's attention does each step; a backend may do both in
        one kernel where that is faster."""
        self.write_kv(key_cache, value_cache, key, value, group.slot_mapping, kv_scales)
        return self.forward(query, key_cache, value_cache, metadata, group, scale=scale,
                            sliding_window=sliding_window, softcap=softcap, kv_scales=kv_scales)

    @classmethod
    def is_available(cls, device: torch.device) -> tuple[bool, str]:
        """(True, "") where the backend can run on `device`, else (False, reason)."""
        return True, ""
