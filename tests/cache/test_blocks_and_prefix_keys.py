"""One definition each: blocks for tokens, and the prefix key the router shares with the cache."""

from __future__ import annotations

from pagedserve.cache.blocks import blocks_for
from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.cache.prefix_cache import extend_block_hashes, first_block_key


def test_blocks_for_tokens() -> None:
    assert [blocks_for(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_the_router_key_is_the_cache_key_of_the_first_block() -> None:
    tokens = list(range(100, 140))
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, 16)
    assert first_block_key(tokens, 16) == hashes[0]
    assert first_block_key(tokens[:15], 16) is None
    assert first_block_key(tokens[:16], 16) == first_block_key(tokens, 16) != first_block_key([0] + tokens, 16)
    # The cache stores a served prompt's first block under that key: a replica that served it holds it.
    manager = KVCacheManager(16, [None], (8,), True)
    assert manager.allocate_slots("r", 0, len(tokens))
    manager.cache_full_blocks("r", tokens, len(tokens))
    assert manager.pools[0].lookup(first_block_key(tokens, 16)) is not None
