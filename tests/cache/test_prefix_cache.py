"""Prefix hashes: each block's hash is chained from its parent's, so a hash names a whole prefix."""

from __future__ import annotations

from pagedserve.cache.prefix_cache import extend_block_hashes, hash_block


def test_chained_hashes_name_whole_prefixes():
    one, two = [], []
    extend_block_hashes(one, [1, 2, 3, 4, 5, 6], 2)
    extend_block_hashes(two, [9, 9, 3, 4, 5, 6], 2)
    assert len(one) == 3
    assert one[1] != two[1], "same block after a different prefix must hash differently"
    assert one[0] == hash_block(None, [1, 2])
