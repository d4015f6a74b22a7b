"""Per-request block tables for one layer group.

A block table is a list indexed by logical block (`position // block_size`); each entry is a block id
of the group's pool. The full-attention allocator only ever appends. The sliding-window allocator also
releases blocks whose every position fell out of the window (their entry becomes `None`), so a long
Mistral conversation holds about window/block_size blocks, not length/block_size: freed blocks go back
to the pool and are recycled by other requests (and by this one, as it grows: a ring over blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.cache.block_pool import BlockPool
from pagedserve.cache.blocks import blocks_for

BlockTable = list  # list[int | None]


@dataclass(frozen=True)
class BlockCopy:
    """Copy-on-write: the runner copies `src` into `dst` before the step that writes `dst`."""

    group: int
    src: int
    dst: int


class FullAttentionCacheAllocator:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def release_unneeded(self, table: BlockTable, num_computed_tokens: int) -> None:
        """Full attention needs every earlier position: nothing to release."""

    def num_blocks_to_allocate(self, table: BlockTable, num_computed_tokens: int, num_total_tokens: int) -> int:
        """Fresh blocks needed so that positions [num_computed_tokens, num_total_tokens) can be written."""
        num_new = max(0, blocks_for(num_total_tokens, self.block_size) - len(table))
        return num_new + int(self._needs_copy(table, num_computed_tokens, num_total_tokens))

    def allocate(self, table: BlockTable, num_computed_tokens: int, num_total_tokens: int, group: int) -> list[BlockCopy]:
        """Grow `table` to cover `num_total_tokens`; copy-on-write the first written block if shared."""
        copies = []
        if self._needs_copy(table, num_computed_tokens, num_total_tokens):
            index = num_computed_tokens // self.block_size
            shared = table[index]
            (fresh,) = self.pool.allocate(1)
            copies.append(BlockCopy(group, shared, fresh))
            self.pool.free([shared])
            table[index] = fresh
        num_new = blocks_for(num_total_tokens, self.block_size) - len(table)
        if num_new > 0:
            table.extend(self.pool.allocate(num_new))
        return copies

    def free(self, table: BlockTable) -> None:
        # Tail first, so that the prefix cache evicts a sequence's last blocks before its first ones.
        self.pool.free(block_id for block_id in reversed(table) if block_id is not None)
        table.clear()

    def max_blocks_held(self, num_total_tokens: int, max_chunk_tokens: int) -> int:
        """Most blocks one request of `num_total_tokens` tokens can hold at once."""
        return blocks_for(num_total_tokens, self.block_size)

    def longest_servable_prefix(self, cached: Sequence[int | None], limit: int) -> int:
        """Most leading blocks (at most `limit`) a prompt can take from the cache: every one must be there."""
        for index in range(min(limit, len(cached))):
            if cached[index] is None:
                return index
        return min(limit, len(cached))

    def prefix_table(self, cached: Sequence[int | None], num_blocks: int) -> BlockTable:
        """The start of a table for a prefix hit of `num_blocks` blocks."""
        return list(cached[:num_blocks])

    def _needs_copy(self, table: BlockTable, num_computed_tokens: int, num_total_tokens: int) -> bool:
        if num_total_tokens <= num_computed_tokens:
            return False
        index = num_computed_tokens // self.block_size
        return index < len(table) and table[index] is not None and self.pool.is_shared(table[index])


class SlidingAttentionCacheAllocator(FullAttentionCacheAllocator):
    """Keeps only the blocks that the window still needs: a query at position q reads q-W+1 .. q."""

    def __init__(self, pool: BlockPool, block_size: int, sliding_window: int) -> None:
        super().__init__(pool, block_size)
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.sliding_window = sliding_window

    def release_unneeded(self, table: BlockTable, num_computed_tokens: int) -> None:
        first_needed = max(0, num_computed_tokens - self.sliding_window + 1)
        last_releasable = min(first_needed // self.block_size, len(table))  # blocks wholly before it
        released = []
        for index in range(last_releasable):
            if table[index] is not None:
                released.append(table[index])
                table[index] = None
        self.pool.free(reversed(released))

    def max_blocks_held(self, num_total_tokens: int, max_chunk_tokens: int) -> int:
        # Window before the chunk, the chunk itself, and one block of misalignment.
        in_window = blocks_for(self.sliding_window - 1 + max_chunk_tokens, self.block_size) + 1
        return min(blocks_for(num_total_tokens, self.block_size), in_window)

    def _first_needed_block(self, num_computed_tokens: int) -> int:
        """The first block that a query at position `num_computed_tokens` reads (its window's start)."""
        return max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size

    def longest_servable_prefix(self, cached: Sequence[int | None], limit: int) -> int:
        """Most blocks (at most `limit`) a hit can cover when only the last window's blocks are cached.

        A hit of n blocks needs blocks first_needed(n * block_size) .. n-1, the ones the next token's
        window reads; the blocks before them may long be gone (released, evicted).
        """
        run = 0  # cached blocks in a row ending at `index`
        best = 0
        for index in range(min(limit, len(cached))):
            run = run + 1 if cached[index] is not None else 0
            num_blocks = index + 1
            if run >= num_blocks - self._first_needed_block(num_blocks * self.block_size):
                best = num_blocks
        return best

    def prefix_table(self, cached: Sequence[int | None], num_blocks: int) -> BlockTable:
        first = self._first_needed_block(num_blocks * self.block_size)
        return [None] * first + list(cached[first:num_blocks])
