"""The block pool: owns every KV-cache block id of one layer group, their reference counts, the free
queue and the hash index of cached (prefix) blocks. Pure Python; every operation is O(1) per block.

Invariants (checked by `check_invariants`):
- free + used = total, where a block is free iff its ref count is 0;
- every free block is in the free queue exactly once, in eviction order (least recently freed first);
- a block that carries a hash is found under that hash, and only there.
A freed block keeps its hash (its contents are still valid) until it is handed out again, so a later
request with the same prefix can revive it: that is the prefix cache's LRU eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

BlockHash = bytes


class OutOfBlocksError(RuntimeError):
    """Not enough free blocks; the scheduler answers with preemption, never a crash."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[BlockHash | None] = [None] * num_blocks
        # OrderedDict as an LRU queue with O(1) removal from the middle (a cached block being revived).
        self._free: OrderedDict[int, None] = OrderedDict((block_id, None) for block_id in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_shared(self, block_id: int) -> bool:
        return self._ref_counts[block_id] > 1

    def lookup_hash_of(self, block_id: int) -> BlockHash | None:
        """The hash a block is cached under, or None."""
        return self._hashes[block_id]

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding the tokens of `block_hash`, whether in use or free, or None."""
        return self._cached.get(block_hash)

    # ---- actions -------------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out `num_blocks` fresh blocks (ref count 1), evicting the least recently freed."""
        if num_blocks > len(self._free):
            raise OutOfBlocksError(f"asked for {num_blocks} blocks, {len(self._free)} free of {self.num_blocks}")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def share(self, block_id: int) -> None:
        """Take one more reference to a block in use, or revive a free cached block."""
        if self._ref_counts[block_id] == 0:
            if self._hashes[block_id] is None:
                raise ValueError(f"block {block_id} is free and holds no cached tokens; it cannot be shared")
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per id. Pass a table's blocks tail first: the tail is evicted first."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Mark a full block as holding the tokens of `block_hash`, so later prompts can reuse it."""
        if not self.enable_caching or self._hashes[block_id] is not None:
            return
        if block_hash in self._cached:
            return  # the same tokens are already cached in another block; keep the first
        self._hashes[block_id] = block_hash
        self._cached[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after weights change)."""
        for block_hash, block_id in list(self._cached.items()):
            self._hashes[block_id] = None
            del self._cached[block_hash]

    def _evict(self, block_id: int) -> None:
        block_hash = self._hashes[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._hashes[block_id] = None

    # ---- invariants ----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        free_ids = set(self._free)
        if len(free_ids) != len(self._free):
            raise AssertionError("a block is in the free queue twice")
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise AssertionError(f"block {block_id} has negative ref count {count}")
            if (count == 0) != (block_id in free_ids):
                raise AssertionError(f"block {block_id}: ref count {count} but in free queue: {block_id in free_ids}")
        for block_hash, block_id in self._cached.items():
            if self._hashes[block_id] != block_hash:
                raise AssertionError(f"cached hash index points at block {block_id}, which holds another hash")
        if sum(h is not None for h in self._hashes) != len(self._cached):
            raise AssertionError("a block carries a hash that the index does not know")
