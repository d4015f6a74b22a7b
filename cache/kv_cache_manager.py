"""KV-cache bookkeeping for all layer groups of a model: block tables per request, prefix reuse, forks.

One `BlockPool` and one allocator per layer group (hybrid models such as Gemma-2 have a full-attention
group and a sliding-window group, each with its own cache tensors). Requests are plain ids and token
lists here: this layer knows nothing of the engine's request objects.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.cache.allocators import BlockCopy, FullAttentionCacheAllocator, SlidingAttentionCacheAllocator
from pagedserve.cache.block_pool import BlockHash, BlockPool
from pagedserve.cache.prefix_cache import extend_block_hashes


class KVCacheManager:
    def __init__(
        self,
        block_size: int,
        sliding_windows: Sequence[int | None],
        num_blocks: Sequence[int],
        enable_prefix_caching: bool,
    ) -> None:
        if len(sliding_windows) != len(num_blocks):
            raise ValueError("one block count per layer group is required")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [BlockPool(n, enable_caching=enable_prefix_caching) for n in num_blocks]
        self.allocators: list[FullAttentionCacheAllocator] = [
            FullAttentionCacheAllocator(pool, block_size)
            if window is None
            else SlidingAttentionCacheAllocator(pool, block_size, window)
            for pool, window in zip(self.pools, sliding_windows)
        ]
        self._tables: dict[str, list[list[int | None]]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        self._pending_copies: list[BlockCopy] = []
        self._has_sliding_groups = any(w is not None for w in sliding_windows)
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.pools)

    @property
    def num_free_blocks(self) -> int:
        """Free blocks of the most constrained group (what routing and admission should look at)."""
        return min(pool.num_free_blocks for pool in self.pools)

    @property
    def num_total_blocks(self) -> int:
        return min(pool.num_blocks for pool in self.pools)

    @property
    def usage(self) -> float:
        return max(pool.num_used_blocks / pool.num_blocks for pool in self.pools)

    def block_tables(self, request_id: str) -> list[list[int | None]]:
        """The request's live tables, one per layer group (callers must not modify them)."""
        return self._tables[request_id]

    @property
    def has_sliding_groups(self) -> bool:
        """Whether some table may hold None (a block released after leaving its sliding window)."""
        return self._has_sliding_groups

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    def can_ever_fit(self, num_total_tokens: int, max_chunk_tokens: int) -> bool:
        """False if a request of this length could not fit even in an otherwise empty cache."""
        return all(
            alloc.max_blocks_held(num_total_tokens, max_chunk_tokens) <= pool.num_blocks
            for alloc, pool in zip(self.allocators, self.pools)
        )

    # ---- prefix cache --------------------------------------------------------------------------
    def find_cached_prefix(
        self, request_id: str, prompt_token_ids: Sequence[int], salt: str | None = None
    ) -> tuple[list[list[int | None]], int]:
        """(block table start per group, tokens) of the longest cached prefix of a prompt without blocks.

        A full-attention group needs every block of the prefix; a sliding-window group only the blocks
        that the first new token's window reaches back into (the table holds None before them), so a
        hit on a hybrid model is the longest length that every group can serve. Never the whole
        prompt: the last prompt token is recomputed to get the logits of the first output token, and a
        block being written must not be a shared cached one. `salt` (a LoRA adapter's name) keys the chain:
        only blocks computed under the same salt are found.
        """
        if not self.enable_prefix_caching:
            return [[] for _ in self.pools], 0
        hashes = self._hashes.setdefault(request_id, [])
        extend_block_hashes(hashes, prompt_token_ids, self.block_size, salt)
        limit = max(0, min(len(hashes), (len(prompt_token_ids) - 1) // self.block_size))
        cached = [[pool.lookup(h) for h in hashes[:limit]] for pool in self.pools]
        # Full groups are prefix-closed (any shorter hit is a hit too); a sliding group is not, so the
        # groups take turns shortening the hit until every one of them can serve it.
        num_blocks = limit
        while True:
            shortest = min(
                alloc.longest_servable_prefix(ids, num_blocks) for alloc, ids in zip(self.allocators, cached)
            )
            if shortest == num_blocks:
                break
            num_blocks = shortest
        tables = [
            alloc.prefix_table(ids, num_blocks) if num_blocks else []
            for alloc, ids in zip(self.allocators, cached)
        ]
        return tables, num_blocks * self.block_size

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted prompt's lookup (counted once, not per retry)."""
        if self.enable_prefix_caching:
            self.num_prefix_queries_tokens += num_prompt_tokens
            self.num_prefix_hit_tokens += num_hit_tokens

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                          salt: str | None = None) -> None:
        """Register the blocks that are now full of computed tokens, so later prompts can reuse them (under
        `salt`, as `find_cached_prefix` looks them up)."""
        if not self.enable_prefix_caching or request_id not in self._tables:
            return
        hashes = self._hashes.setdefault(request_id, [])
        extend_block_hashes(hashes, token_ids[:num_computed_tokens], self.block_size, salt)
        # `hashes` may run ahead (the prompt's, from the lookup); only blocks full of computed tokens count.
        for pool, table in zip(self.pools, self._tables[request_id]):
            num_full = min(num_computed_tokens // self.block_size, len(hashes), len(table))
            for index in range(num_full):
                block_id = table[index]
                if block_id is not None:
                    pool.register(block_id, hashes[index])

    # ---- allocation ----------------------------------------------------------------------------
    def allocate_slots(
        self,
        request_id: str,
        num_computed_tokens: int,
        num_new_tokens: int,
        cached_tables: Sequence[Sequence[int | None]] = (),
    ) -> bool:
        """Make room to write `num_new_tokens` after `num_computed_tokens`; False (no change) if full.

        `cached_tables` (from `find_cached_prefix`, only for a request without blocks) are taken by
        reference as the start of each group's table.
        """
        tables = self._tables.get(request_id)
        num_total = num_computed_tokens + num_new_tokens
        if tables is not None and self._has_room(tables, num_computed_tokens, num_total):
            return True  # the common decode step: the last block still has a free, unshared slot
        if tables is None:
            tables = [[] for _ in self.pools]
        for alloc, table in zip(self.allocators, tables):
            alloc.release_unneeded(table, num_computed_tokens)

        cached_tables = cached_tables or [() for _ in self.pools]
        for alloc, table, pool, cached in zip(self.allocators, tables, self.pools, cached_tables):
            padded = table if not cached else [None] * len(cached)  # table length the cached blocks will give
            need = alloc.num_blocks_to_allocate(padded, num_computed_tokens, num_total)
            need += sum(1 for block_id in cached if block_id is not None and pool.ref_count(block_id) == 0)
            if not pool.can_allocate(need):
                return False

        for table, pool, cached in zip(tables, self.pools, cached_tables):
            for block_id in cached:
                if block_id is not None:
                    pool.share(block_id)
            table.extend(cached)
        for group, (alloc, table) in enumerate(zip(self.allocators, tables)):
            self._pending_copies.extend(alloc.allocate(table, num_computed_tokens, num_total, group))
        self._tables[request_id] = tables
        return True

    def _has_room(self, tables: list[list[int | None]], num_computed: int, num_total: int) -> bool:
        if self._has_sliding_groups:
            return False  # they must release blocks that left the window
        index = num_computed // self.block_size
        for pool, table in zip(self.pools, tables):
            if len(table) * self.block_size < num_total:
                return False
            if index < len(table) and pool.is_shared(table[index]):
                return False
        return True

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give `child_id` the parent's blocks by reference (n > 1 completions share the prompt)."""
        tables = []
        for pool, table in zip(self.pools, self._tables[parent_id]):
            for block_id in table:
                if block_id is not None:
                    pool.share(block_id)
            tables.append(list(table))
        self._tables[child_id] = tables
        self._hashes[child_id] = list(self._hashes.get(parent_id, []))

    def free(self, request_id: str) -> None:
        tables = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if tables is None:
            return
        for alloc, table in zip(self.allocators, tables):
            alloc.free(table)

    def take_pending_copies(self) -> list[BlockCopy]:
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def check_invariants(self) -> None:
        for pool in self.pools:
            pool.check_invariants()
        for group, pool in enumerate(self.pools):
            counts = [0] * pool.num_blocks
            for tables in self._tables.values():
                for block_id in tables[group]:
                    if block_id is not None:
                        counts[block_id] += 1
            for block_id, count in enumerate(counts):
                if count != pool.ref_count(block_id):
                    raise AssertionError(
                        f"group {group} block {block_id}: {count} table references, ref count {pool.ref_count(block_id)}"
                    )
