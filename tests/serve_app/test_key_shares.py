"""Each API key's share of a replica's KV blocks (serve_app/key_shares.py): the water-filling, the window of
recent demand, and what a request of one key must leave for the others. No Ray."""

from __future__ import annotations

from pagedserve.serve_app.key_shares import CommittedBlocks, KeyShares, RecentPeak, max_min_shares
from fake_clock import FakeClock  # beside this file (conftest puts the folder on sys.path)


def test_light_keys_get_what_they_use_and_heavy_keys_split_the_rest() -> None:
    assert max_min_shares(40, {"calm": 1, "flood": 500}) == {"calm": 1, "flood": 39}
    assert max_min_shares(40, {"a": 100, "b": 100}) == {"a": 20, "b": 20}
    assert max_min_shares(40, {"light": 4, "a": 100, "b": 100}) == {"light": 4, "a": 18, "b": 18}
    # Whole blocks, never more than there are: what rounding leaves goes to the last.
    assert max_min_shares(40, {"a": 100, "b": 100, "c": 100}) == {"a": 13, "b": 13, "c": 14}
    assert max_min_shares(40, {"a": 5, "b": 6}) == {"a": 5, "b": 6}  # room to spare: everyone gets its demand


def test_a_peak_lasts_the_window_and_a_larger_one_replaces_it() -> None:
    peak = RecentPeak(window_s=10.0)
    assert peak.value(0.0) == 0
    peak.add(0.0, 8)
    peak.add(5.0, 3)
    assert peak.value(9.0) == 8
    assert peak.value(12.0) == 3  # the 8 left the window
    peak.add(13.0, 4)
    assert peak.value(13.0) == 4
    assert peak.value(30.0) == 0


def test_what_a_request_must_leave_for_the_other_keys() -> None:
    clock = FakeClock()
    shares = KeyShares(window_s=10.0, clock=clock)
    shares.note_demand("flood", 40)
    # Alone, the flood is owed to nobody: it may use every block.
    assert shares.owed_to_others("flood", 8, 40, {"flood": 32}) == 0
    shares.note_demand("calm", 1)
    # The calm key holds nothing and is owed its block: every flood request must leave it (a lighter key).
    assert shares.owed_to_others("flood", 8, 40, {"flood": 32}) == 1
    assert shares.owed_to_others("flood", 8, 40, {"flood": 8}) == 1
    # While the calm key holds its block, nothing more is owed to it.
    assert shares.owed_to_others("flood", 8, 40, {"flood": 32, "calm": 1}) == 0
    # A key holding nothing on a replica may always start one request there. Within its share a key leaves
    # nothing of what a heavier key is owed, past it everything.
    assert shares.owed_to_others("calm", 1, 40, {"flood": 39}) == 0
    shares.note_demand("calm", 2)
    assert shares.owed_to_others("calm", 1, 40, {"flood": 24, "calm": 1}) == 0
    assert shares.owed_to_others("calm", 8, 40, {"flood": 24, "calm": 1}) == 14
    # Two keys as heavy: each may hold half; a request leaves the other's unused half.
    shares.note_demand("calm", 40)
    assert shares.owed_to_others("flood", 8, 40, {"flood": 8, "calm": 4}) == 16
    assert shares.owed_to_others("flood", 8, 40, {"flood": 16, "calm": 20}) == 0
    # Past the window the calm key is forgotten and the flood may fill the replica again.
    clock.now += 11
    shares.note_demand("flood", 40)
    assert shares.owed_to_others("flood", 8, 40, {"flood": 32}) == 0
    assert shares.active_demands() == {"flood": 40}


def test_committed_blocks_sum_by_key_and_remember_each_keys_recent_peak() -> None:
    clock = FakeClock()
    committed = CommittedBlocks(window_s=10.0, clock=clock)
    committed.add("a1", "alice", 3)
    committed.add("a2", "alice", 4)
    committed.add("b1", "bob", 2)
    committed.add("e1", "", 1)  # no API key
    assert committed.by_key() == {"alice": 7, "bob": 2, "": 1} and committed.total == 10
    committed.remove("a1")
    committed.remove("b1")
    committed.remove("b1")  # twice: nothing more
    assert committed.by_key() == {"alice": 4, "": 1} and committed.total == 5
    assert committed.peak_by_key() == {"alice": 7, "bob": 2, "": 1}  # bob ended, but wanted 2 within the window
    clock.now += 11
    committed.add("a3", "alice", 1)
    assert committed.peak_by_key() == {"alice": 5}  # the older peaks are past the window
    assert CommittedBlocks(window_s=0.0, clock=clock).peak_by_key() == {}


def test_committed_blocks_refuse_a_key_past_its_share_only_while_another_key_is_owed_room() -> None:
    clock = FakeClock()
    committed = CommittedBlocks(window_s=10.0, clock=clock)
    for index in range(4):  # the flood alone: it may take everything
        assert committed.leaves_others_room("flood", 8, 40)
        committed.add(f"f{index}", "flood", 8)
    committed.add("c0", "calm", 1)
    committed.remove("c0")  # the calm key's request ended; it stays owed its block within the window
    assert not committed.leaves_others_room("flood", 8, 40)  # 8 free, 1 owed to the calm key
    assert committed.leaves_others_room("flood", 7, 40)
    assert committed.leaves_others_room("calm", 8, 40)  # holding nothing here, a key may always start one
    committed.add("c1", "calm", 1)
    assert committed.leaves_others_room("calm", 4, 40)  # within its share: it owes the heavier flood nothing
    # The calm key holds what it is owed, but a flood request that does not fit would wait in the engine and take
    # the calm key's block when it frees, ahead of its next request: turned back too.
    assert not committed.leaves_others_room("flood", 8, 40) and committed.leaves_others_room("flood", 7, 40)
    clock.now += 11  # the window passed without a calm request: only the one it holds counts
    committed.remove("c1")
    assert committed.leaves_others_room("flood", 8, 40)

