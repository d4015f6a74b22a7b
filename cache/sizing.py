"""How many KV-cache blocks fit: from free device memory, the model's shape, dtype and TP degree.

The model runner measures (weights loaded, one profiling forward at `max_batch_tokens`); this module
turns the measurement into a `MemoryPlan`. On GPU the engine may use `max_memory_percent` of the card;
on CPU, where RAM is shared with everything else, a bounded share of the available RAM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagedserve.cache.blocks import blocks_for

GIB = 1024**3


@dataclass(frozen=True)
class GroupShape:
    """KV geometry of one layer group on one rank."""

    num_layers: int
    num_kv_heads: int  # per rank
    head_dim: int
    sliding_window: int | None

    def bytes_per_block(self, block_size: int, dtype_bytes: int) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class MemoryPlan:
    device_total_bytes: int
    budget_bytes: int  # what the engine may use in all
    weights_bytes: int
    activation_peak_bytes: int
    kv_bytes: int
    num_blocks: tuple[int, ...]
    block_size: int
    cuda_graph_bytes: int = 0  # reserved for the decode CUDA graphs, captured after the KV cache
    kv_cache_dtype: str = ""  # what the cache stores: the model's dtype name, or fp8_e4m3

    @property
    def kv_tokens(self) -> int:
        """Tokens of full-attention context the cache holds (the binding group)."""
        return min(self.num_blocks) * self.block_size

    def describe(self) -> str:
        return (
            f"memory plan: budget {self.budget_bytes / GIB:.2f} GiB of {self.device_total_bytes / GIB:.2f} GiB; "
            f"weights {self.weights_bytes / GIB:.3f} GiB, activations {self.activation_peak_bytes / GIB:.3f} GiB, "
            + (f"CUDA graphs {self.cuda_graph_bytes / GIB:.3f} GiB, " if self.cuda_graph_bytes else "")
            + f"KV cache{f' ({self.kv_cache_dtype})' if self.kv_cache_dtype else ''} {self.kv_bytes / GIB:.3f} GiB = blocks {list(self.num_blocks)} x {self.block_size} tokens "
            f"({self.kv_tokens} tokens of context)"
        )


def cpu_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_budget_bytes(
    *,
    is_gpu: bool,
    device_total_bytes: int,
    device_free_bytes: int,
    max_memory_percent: float,
    weights_bytes: int,
    activation_peak_bytes: int,
    max_cpu_kv_bytes: int,
    cuda_graph_bytes: int = 0,
) -> tuple[int, int]:
    """(budget for the whole engine, bytes left for the KV cache). `cuda_graph_bytes`: what the decode
    graphs will hold (their private memory pool and shared output), set aside before the cache."""
    if is_gpu:
        # Others may hold memory on the card too: never take more than is free now.
        budget = int(device_total_bytes * max_memory_percent)
        used_by_others = device_total_bytes - device_free_bytes - weights_bytes
        kv = budget - weights_bytes - activation_peak_bytes - cuda_graph_bytes - max(0, used_by_others)
        return budget, max(0, kv)
    budget = int(device_free_bytes * max_memory_percent)
    kv = min(max_cpu_kv_bytes, budget - activation_peak_bytes)
    return budget, max(0, kv)


def plan_num_blocks(
    kv_bytes: int,
    groups: list[GroupShape],
    block_size: int,
    dtype_bytes: int,
    *,
    max_num_seqs: int,
    max_model_len: int,
    max_batch_tokens: int,
) -> tuple[int, ...]:
    """Blocks per group. Full groups share one count; sliding groups get what their windows can use."""
    per_block = [g.bytes_per_block(block_size, dtype_bytes) for g in groups]
    # More blocks than every running request could hold at once are never used.
    full_cap = max_num_seqs * blocks_for(max_model_len, block_size) + 1
    sliding_caps = {
        i: max_num_seqs * min(blocks_for(max_model_len, block_size), blocks_for(g.sliding_window - 1 + max_batch_tokens, block_size) + 1)
        for i, g in enumerate(groups)
        if g.sliding_window is not None
    }
    full_bytes = sum(b for g, b in zip(groups, per_block) if g.sliding_window is None)
    if full_bytes == 0:  # every layer slides
        return tuple(max(1, min(sliding_caps[i], kv_bytes // per_block[i] // len(groups))) for i in range(len(groups)))
    sliding_bytes_capped = sum(sliding_caps[i] * per_block[i] for i in sliding_caps)
    num_full = (kv_bytes - sliding_bytes_capped) // full_bytes
    if num_full < max(sliding_caps.values(), default=0):
        # Memory is tight: give every group the same count.
        num_full = kv_bytes // sum(per_block)
    num_full = max(1, min(num_full, full_cap))
    return tuple(
        num_full if g.sliding_window is None else max(1, min(num_full, sliding_caps[i])) for i, g in enumerate(groups)
    )
