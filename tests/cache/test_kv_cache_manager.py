"""Property-based tests of the KV cache manager over full, sliding and hybrid layer groups: no leak, no
double free, no block cached before it is full, every block a window reads held; prefix hits on sliding
groups hold only the window."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.cache.kv_cache_manager import KVCacheManager


operations = st.lists(
    st.tuples(st.sampled_from(["grow", "free", "fork", "cache"]), st.integers(0, 5), st.integers(1, 40)),
    max_size=60,
)


WINDOW = 12
LAYOUTS = {"full": [None], "hybrid": [None, WINDOW], "sliding": [WINDOW]}


@settings(max_examples=90, deadline=None)
@given(ops=operations, layout=st.sampled_from(list(LAYOUTS)), caching=st.booleans())
def test_manager_never_leaks_or_double_frees(ops, layout, caching):
    windows = LAYOUTS[layout]
    manager = KVCacheManager(4, windows, [24] * len(windows), enable_prefix_caching=caching)
    computed: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    for op, slot, amount in ops:
        request_id = f"r{slot}"
        if op == "grow":
            start = computed.get(request_id, 0)
            cached, num_cached = ([], 0)
            if request_id not in computed:
                tokens[request_id] = [slot * 7 + i % 5 for i in range(200)]
                cached, num_cached = manager.find_cached_prefix(request_id, tokens[request_id][: start + amount])
                start = num_cached
            if manager.allocate_slots(request_id, start, amount, cached):
                computed[request_id] = start + amount
        elif op == "free" and request_id in computed:
            manager.free(request_id)
            del computed[request_id]
        elif op == "fork" and request_id in computed:
            child = f"c{slot}-{len(computed)}"
            if child not in computed:
                manager.fork(request_id, child)
                computed[child] = computed[request_id]
                tokens[child] = list(tokens[request_id])
        elif op == "cache" and request_id in computed:
            manager.cache_full_blocks(request_id, tokens[request_id], computed[request_id])
        manager.take_pending_copies()
        manager.check_invariants()
        for owner, num_computed in computed.items():
            for window, pool, table in zip(windows, manager.pools, manager.block_tables(owner)):
                for index, block_id in enumerate(table):
                    if block_id is not None and pool.lookup_hash_of(block_id) is not None:
                        assert (index + 1) * 4 <= num_computed, "a block was cached before it was full of computed tokens"
                # Every block the next token's window reads is held (a prefix hit included).
                first_needed = max(0, num_computed - (window or num_computed + 1) + 1) // 4
                assert all(block_id is not None for block_id in table[first_needed:]), (owner, table)
    for request_id in list(computed):
        manager.free(request_id)
    manager.check_invariants()
    assert all(pool.num_free_blocks == pool.num_blocks for pool in manager.pools)


def test_sliding_and_hybrid_hits_take_only_the_window_they_need():
    """A prompt's hit on a sliding group holds the blocks its window reads, None before them."""
    for windows in ([None, WINDOW], [WINDOW]):
        manager = KVCacheManager(4, windows, [24] * len(windows), enable_prefix_caching=True)
        prompt = list(range(100, 140))  # 40 tokens: 10 full blocks
        for computed in range(0, 40, 4):  # one block per step: the sliding group releases as it goes
            assert manager.allocate_slots("a", computed, 4)
            manager.cache_full_blocks("a", prompt, computed + 4)
        assert manager.block_tables("a")[-1][:6] == [None] * 6
        manager.free("a")
        tables, num_cached = manager.find_cached_prefix("b", prompt + [1, 2, 3, 4])
        assert num_cached == 40
        first_needed = (40 - WINDOW + 1) // 4  # block 7: positions 28.. are in the window of position 40
        assert tables[-1][:first_needed] == [None] * first_needed and None not in tables[-1][first_needed:]
        if windows[0] is None:
            assert len(tables[0]) == 10 and None not in tables[0]
        assert manager.allocate_slots("b", num_cached, 4, tables)
        manager.check_invariants()
        # A prompt that differs inside the window cannot use the blocks after the difference.
        other = prompt[:34] + [7] + prompt[35:]
        _, num_cached = manager.find_cached_prefix("c", other + [1])
        assert num_cached == 32
        manager.free("b")
        manager.check_invariants()
        assert all(pool.num_free_blocks == pool.num_blocks for pool in manager.pools)
