"""The block pool: allocate, share and free by reference count, cached blocks kept until evicted LRU."""

from __future__ import annotations

import pytest

from pagedserve.cache.block_pool import BlockPool, OutOfBlocksError


def test_allocate_free_share_round_trip():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1
    pool.share(blocks[0])
    pool.free(blocks)
    assert pool.num_free_blocks == 3 and pool.ref_count(blocks[0]) == 1
    pool.free([blocks[0]])
    assert pool.num_free_blocks == 4
    with pytest.raises(ValueError, match="double free"):
        pool.free([blocks[0]])
    with pytest.raises(OutOfBlocksError):
        pool.allocate(5)
    pool.check_invariants()


def test_cached_block_survives_free_until_evicted_lru():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.register(a, b"A")
    pool.register(b, b"B")
    pool.free([b, a, c])  # free order decides eviction order: b first
    assert pool.lookup(b"A") == a and pool.lookup(b"B") == b
    (fresh,) = pool.allocate(1)
    assert fresh == b and pool.lookup(b"B") is None and pool.lookup(b"A") == a
    pool.share(a)  # revive a free cached block
    assert pool.ref_count(a) == 1 and pool.num_free_blocks == 1
    pool.check_invariants()
