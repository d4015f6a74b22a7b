"""Pure router policy: placement by free blocks, optimistic accounting, affinity, admission queue. No Ray."""

from __future__ import annotations

import pytest
from pagedserve.config.serve import RouterSettings
from pagedserve.serve_app.messages import ReplicaReport, RoutingDemand
from pagedserve.serve_app.router import AdmissionQueue, FreeBlocksPolicy
from fake_clock import FakeClock  # beside this file (conftest puts the folder on sys.path)


def report(free: int, total: int, at: float, block_size: int = 16, blocks_by_key: dict[str, int] | None = None,
           recent: frozenset[str] = frozenset(), peaks: dict[str, int] | None = None) -> ReplicaReport:
    return ReplicaReport(num_free_blocks=free, num_total_blocks=total, block_size=block_size, report_time_s=at,
                         recent_request_ids=recent, blocks_by_key=blocks_by_key or {}, peak_blocks_by_key=peaks or {})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def test_prefers_most_free_blocks(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(10, 100, clock.now))
    policy.update_report("b", report(50, 100, clock.now))
    decision = policy.decide(["a", "b"], RoutingDemand(32, 16))
    assert decision.kind == "route"
    assert decision.replicas == ["b", "a"]


def test_skips_replica_without_room(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("small", report(4, 8, clock.now))
    policy.update_report("big", report(2, 64, clock.now))
    # 100 tokens = 7 blocks: only "small" has 4 free... neither has room right now.
    assert policy.decide(["small", "big"], RoutingDemand(80, 20)).kind == "wait"
    # 48 tokens = 3 blocks: only "small" has room.
    assert policy.decide(["small", "big"], RoutingDemand(40, 8)).replicas == ["small"]


def test_too_large_for_every_replica_names_the_numbers(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(8, 8, clock.now))
    policy.update_report("b", report(16, 16, clock.now))
    decision = policy.decide(["a", "b"], RoutingDemand(300, 100))
    assert decision.kind == "too_large"
    assert "needs 400 tokens" in decision.message and "holds 256" in decision.message  # the largest: 16 x 16


def test_a_replica_whose_engine_died_gets_no_requests(clock: FakeClock) -> None:
    """Its dead engine holds nothing, so it reports (and a stale view would show) the most room: it is
    skipped for generation; a request that fits only it waits for its replacement (not a 400); calls
    without a demand (health, model info) go to it only when nothing else is left."""
    from dataclasses import replace

    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("big", replace(report(64, 64, clock.now), engine_dead=True))
    policy.update_report("small", report(4, 8, clock.now))
    assert policy.decide(["big", "small"], RoutingDemand(40, 8)).replicas == ["small"]
    assert policy.decide(["big", "small"], RoutingDemand(300, 100)).kind == "wait"  # fits only "big"
    assert policy.decide(["big", "small"], RoutingDemand(3000, 100)).kind == "too_large"
    assert policy.decide(["big", "small"], None).replicas == ["small"]
    assert policy.decide(["big"], None).replicas == ["big"]
    assert policy.decide(["big"], RoutingDemand(40, 8)).kind == "wait"
    policy.update_report("big", report(64, 64, clock.now + 1))  # replaced (or recovered)
    assert policy.decide(["big", "small"], RoutingDemand(40, 8)).replicas == ["big", "small"]


def test_a_dead_engine_is_read_from_the_replicas_stats() -> None:
    stats = {"num_free_blocks": 0, "num_total_blocks": 64, "block_size": 16, "engine_dead": True}
    assert ReplicaReport.from_routing_stats(stats).engine_dead
    assert not ReplicaReport.from_routing_stats({**stats, "engine_dead": False}).engine_dead
    assert not ReplicaReport.from_routing_stats({k: v for k, v in stats.items() if k != "engine_dead"}).engine_dead


def test_optimistic_accounting_between_reports(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(10, 10, clock.now))
    clock.now += 0.1
    policy.reserve("a", "r1", RoutingDemand(64, 16))  # 5 blocks
    assert policy.estimated_free_blocks("a") == 5
    policy.reserve("a", "r2", RoutingDemand(64, 16))
    assert policy.estimated_free_blocks("a") == 0
    assert policy.decide(["a"], RoutingDemand(10, 6)).kind == "wait"
    policy.release("r2")  # finished before any report counted it: it holds nothing, its blocks come back
    assert policy.estimated_free_blocks("a") == 5
    assert policy.num_in_flight("a") == 1
    # A report taken after r1 was sent counts r1 itself: no double subtraction.
    clock.now += 1.0
    policy.update_report("a", report(7, 10, clock.now - 0.5))
    assert policy.estimated_free_blocks("a") == 7
    assert policy.num_in_flight("a") == 1
    # An older report is ignored.
    policy.update_report("a", report(1, 10, clock.now - 0.9))
    assert policy.estimated_free_blocks("a") == 7
    # r1 finishes: its blocks come back with the next report, not before.
    policy.release("r1")
    assert policy.estimated_free_blocks("a") == 7 and policy.num_in_flight("a") == 0
    clock.now += 1.0
    policy.update_report("a", report(10, 10, clock.now - 0.1))
    assert policy.estimated_free_blocks("a") == 10


def test_report_older_than_send_keeps_reservation(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(10, 10, clock.now - 2))
    policy.reserve("a", "r1", RoutingDemand(32, 0))  # 2 blocks
    policy.update_report("a", report(10, 10, clock.now - 1))  # taken before the send
    assert policy.estimated_free_blocks("a") == 8


def test_prefix_affinity_breaks_near_ties(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(RouterSettings(affinity_tolerance=0.1), transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(100, 100, clock.now - 1))
    policy.update_report("b", report(100, 100, clock.now - 1))
    policy.reserve("b", "first", RoutingDemand(16, 16, prefix_key=42))  # b now has 2 fewer blocks
    decision = policy.decide(["a", "b"], RoutingDemand(16, 16, prefix_key=42))
    assert decision.replicas[0] == "b"
    # Without the prefix the emptier replica wins.
    assert policy.decide(["a", "b"], RoutingDemand(16, 16)).replicas[0] == "a"
    # Far from a tie, headroom wins over affinity.
    policy.update_report("b", report(30, 100, clock.now + 1))
    assert policy.decide(["a", "b"], RoutingDemand(16, 16, prefix_key=42)).replicas[0] == "a"
    # One request's worth is no imbalance, whatever the share: a large request goes back to its prefix's owner
    # while the owner lags by no more than its blocks (the blocks of one that just ended, say).
    strict = FreeBlocksPolicy(RouterSettings(affinity_tolerance=0.0), transit_grace_s=0.0, clock=clock)
    strict.update_report("a", report(64, 64, clock.now))
    strict.update_report("b", report(64 - 13, 64, clock.now))
    strict.reserve("b", "first", RoutingDemand(195, 1, prefix_key=7))  # 13 blocks
    strict.release("first")
    assert strict.decide(["a", "b"], RoutingDemand(195, 1, prefix_key=7)).replicas[0] == "b"
    assert strict.decide(["a", "b"], RoutingDemand(100, 1, prefix_key=7)).replicas[0] == "a"  # 7 blocks


def test_new_prefixes_spread_over_idle_replicas_and_stay_where_they_went(clock: FakeClock) -> None:
    """Between equal headroom the replica owning fewer prefixes wins, so a shared-prefix workload's prefixes
    split evenly over the caches; each prefix then keeps going where it went first."""
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    for replica in ("a", "b"):
        policy.update_report(replica, report(100, 100, clock.now))
    owners = {}
    for prefix in range(8):
        owners[prefix] = policy.decide(["a", "b"], RoutingDemand(16, 16, prefix_key=prefix)).replicas[0]
        policy.reserve(owners[prefix], f"first-{prefix}", RoutingDemand(16, 16, prefix_key=prefix))
        policy.release(f"first-{prefix}")
    assert sorted(owners.values()) == ["a"] * 4 + ["b"] * 4
    for prefix in range(8):
        assert policy.decide(["a", "b"], RoutingDemand(16, 16, prefix_key=prefix)).replicas[0] == owners[prefix]


def test_a_flooding_key_leaves_each_replica_the_room_another_active_key_is_owed(clock: FakeClock) -> None:
    """Issue 28's long-answer flood, on the policy: 40 blocks, the flood's requests take 8 each, the calm key's
    1. The calm key, active within the window, is owed its block: the flood's request that would take it is
    turned back (`over_share`, which the ingress's fair queue holds), the calm key's routes at once. One key
    alone fills the replica; a key idle past the window is owed nothing."""
    policy = FreeBlocksPolicy(RouterSettings(fair_share_window_s=10.0), transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(40, 40, clock.now))
    flood, calm = RoutingDemand(8, 120, api_key_name="flood"), RoutingDemand(8, 4, api_key_name="calm")
    for index in range(5):  # alone, the flood takes every block
        assert policy.decide(["a"], flood).kind == "route"
        policy.reserve("a", f"flood-{index}", flood)
    assert policy.estimated_free_blocks("a") == 0
    for index in range(5):
        policy.release(f"flood-{index}")
    assert policy.decide(["a"], calm).kind == "route"  # the calm key is active now (its peak: 1 block)
    policy.reserve("a", "calm-0", calm)
    policy.release("calm-0")
    for index in range(4):
        assert policy.decide(["a"], flood).kind == "route"
        policy.reserve("a", f"flood-{index}", flood)
    assert policy.estimated_free_blocks("a") == 8 and policy.decide(["a"], flood).kind == "over_share"
    assert policy.decide(["a"], calm).replicas == ["a"]
    policy.reserve("a", "calm-1", calm)
    # While the calm key holds its block it is owed nothing more: the flood takes what is left but that block.
    small_flood = RoutingDemand(8, 100, api_key_name="flood")  # 7 blocks
    assert policy.decide(["a"], small_flood).kind == "route"
    policy.release("calm-1")
    clock.now += 11  # the calm key idle past the window: the flood may fill the replica again
    assert policy.decide(["a"], small_flood).kind == "route"
    # Without shares (window 0) the flood takes the calm key's block too.
    plain = FreeBlocksPolicy(RouterSettings(fair_share_window_s=0.0), transit_grace_s=0.0, clock=clock)
    plain.update_report("a", report(8, 40, clock.now))
    plain.decide(["a"], calm)
    assert plain.decide(["a"], flood).kind == "route"


def test_a_key_waits_in_its_ingress_while_it_holds_blocks_and_other_keys_are_active(clock: FakeClock) -> None:
    """With another key active, a key that holds blocks (its requests running, or ended since the latest report
    counted them: that report still holds those) is turned back (`over_share`) when there is no room, so it
    waits in its ingress and not in Ray's routing line ahead of the other key; a key holding nothing waits in
    that line as before."""
    policy = FreeBlocksPolicy(RouterSettings(fair_share_window_s=10.0), transit_grace_s=0.5, clock=clock)
    policy.update_report("a", report(40, 40, clock.now))
    flood, calm = RoutingDemand(8, 120, api_key_name="flood"), RoutingDemand(8, 4, api_key_name="calm")
    policy.decide(["a"], calm)  # the calm key is active
    for index in range(5):
        policy.reserve("a", f"flood-{index}", flood)
    clock.now += 1.0
    policy.update_report("a", report(0, 40, clock.now, blocks_by_key={"flood": 40}))  # counts the five
    for index in range(5):
        policy.release(f"flood-{index}")  # ended, but the latest report holds their blocks
    assert policy.held_blocks("a") == {"flood": 40} and policy.num_in_flight("a") == 0
    assert policy.decide(["a"], flood).kind == "over_share"
    assert policy.decide(["a"], calm).kind == "wait"
    clock.now += 0.5
    policy.update_report("a", report(40, 40, clock.now))  # taken after they ended: they are gone
    assert policy.held_blocks("a") == {} and policy.decide(["a"], calm).kind == "route"


def lora_report(free: int, total: int, at: float, slots: list[str] = (), host: list[str] = (),
                num_slots: int = 2) -> ReplicaReport:
    """A report as the replica's routing stats carry it (through `from_routing_stats`); `slots` least recently used
    first."""
    return ReplicaReport.from_routing_stats({
        "num_free_blocks": free, "num_total_blocks": total, "block_size": 16, "report_time_s": at,
        "num_lora_slots": num_slots, "lora_slot_names": list(slots), "lora_host_names": list(host)})


def test_lora_requests_go_first_to_replicas_holding_the_adapter(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(90, 100, clock.now))
    policy.update_report("b", lora_report(50, 100, clock.now, slots=["sql"], host=["sql"]))
    policy.update_report("c", report(10, 100, clock.now))
    assert policy.decide(["a", "b", "c"], RoutingDemand(16, 16, lora_name="sql")).replicas == ["b", "a", "c"]
    # A replica without room is not chosen for holding the adapter; the base model ignores adapters.
    assert policy.decide(["a", "b"], RoutingDemand(16, 50 * 16, lora_name="sql")).replicas == ["a"]
    assert policy.decide(["a", "b"], RoutingDemand(16, 16)).replicas == ["a", "b"]
    assert policy.holds_lora("b", "sql") and not policy.holds_lora("a", "sql")  # the hit/miss metric's test


def test_a_hot_adapter_spreads_once_its_holders_fall_behind_in_headroom(clock: FakeClock) -> None:
    """`lora_affinity_tolerance`: holding the adapter puts a replica first only while its headroom is within that
    share of its blocks (or within the request's own blocks) of the best; past it the replica with the most room
    goes first (it loads the adapter too) and the holder ranks after the rest by headroom. 1.0: holders first
    whenever they have room (the hot adapter's requests fill them while the others idle)."""
    sql = RoutingDemand(16, 16, lora_name="sql")  # 2 blocks
    policy = FreeBlocksPolicy(RouterSettings(lora_affinity_tolerance=0.5), transit_grace_s=0.0, clock=clock)
    policy.update_report("a", lora_report(95, 100, clock.now))
    policy.update_report("b", lora_report(60, 100, clock.now, slots=["sql"]))
    policy.update_report("c", lora_report(44, 100, clock.now, host=["sql"]))
    # Headroom a 93, b 58, c 42: b within 50 of the best holds it in a slot; c, 51 behind, only by headroom.
    assert policy.decide(["a", "b", "c"], sql).replicas == ["b", "a", "c"]
    clock.now += 1.0
    policy.update_report("b", lora_report(43, 100, clock.now, slots=["sql"]))  # its sql requests piled up
    assert policy.decide(["a", "b", "c"], sql).replicas == ["a", "c", "b"]
    # Tolerance 0: within the request's own blocks of the best only.
    strict = FreeBlocksPolicy(RouterSettings(lora_affinity_tolerance=0.0), transit_grace_s=0.0, clock=clock)
    strict.update_report("a", lora_report(95, 100, clock.now))
    strict.update_report("b", lora_report(93, 100, clock.now, slots=["sql"]))
    assert strict.decide(["a", "b"], sql).replicas == ["b", "a"]
    clock.now += 1.0
    strict.update_report("b", lora_report(92, 100, clock.now, slots=["sql"]))
    assert strict.decide(["a", "b"], sql).replicas == ["a", "b"]
    always = FreeBlocksPolicy(RouterSettings(lora_affinity_tolerance=1.0), transit_grace_s=0.0, clock=clock)
    always.update_report("a", lora_report(95, 100, clock.now))
    always.update_report("b", lora_report(3, 100, clock.now, slots=["sql"]))
    assert always.decide(["a", "b"], sql).replicas == ["b", "a"]


def test_lora_affinity_goes_by_device_slots_then_host_memory_not_by_registration(clock: FakeClock) -> None:
    """With lora_modules every replica registers every adapter: only the `max_loras` in a replica's device slots run
    at once there, so they decide (and count as a hit); one in host memory only needs a copy into a slot, so such
    a replica comes next; then the rest, by headroom within each group. Affinity never picks a replica without
    room."""
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    everything = ["sql", "chat", "math", "code"]
    policy.update_report("a", lora_report(90, 100, clock.now, slots=["sql", "chat"], host=everything))
    policy.update_report("b", lora_report(60, 100, clock.now, slots=["math", "code"], host=["sql", "math", "code"]))
    policy.update_report("c", lora_report(80, 100, clock.now, slots=[], host=[]))
    for name, order in {"sql": ["a", "b", "c"], "chat": ["a", "c", "b"], "math": ["b", "a", "c"],
                        "code": ["b", "a", "c"]}.items():
        assert policy.decide(["a", "b", "c"], RoutingDemand(16, 16, lora_name=name)).replicas == order, name
    assert [policy.holds_lora(r, "chat") for r in "abc"] == [True, False, False]  # lora_modules registers it everywhere: one hit
    assert [policy.lora_tier(r, "sql") for r in "abc"] == [0, 1, 2]
    # b holds math in a slot but has no room for this request: affinity does not override room.
    assert policy.decide(["a", "b", "c"], RoutingDemand(16, 61 * 16, lora_name="math")).replicas == ["a", "c"]
    # A report taken after an eviction moves the adapter's requests with it.
    clock.now += 1.0
    policy.update_report("a", lora_report(90, 100, clock.now, slots=["chat", "code"], host=everything))
    assert policy.decide(["a", "b", "c"], RoutingDemand(16, 16, lora_name="code")).replicas == ["a", "b", "c"]
    assert not policy.holds_lora("a", "sql") and policy.lora_tier("a", "sql") == 1


def test_adapters_just_sent_to_a_replica_fill_its_slots_least_recently_used_out(clock: FakeClock) -> None:
    """Each request sent loads its adapter into a slot there, evicting the least recently used: between reports the
    router keeps the replica's slots so, never more than it has. Otherwise a replica sent every adapter in turn (each
    send renewing its grace) would count as holding all of them and draw every request while it had room, swapping
    its 2 slots all the while (bench/lora_service_bench.py with lora_modules: every request on one replica)."""
    policy = FreeBlocksPolicy(transit_grace_s=0.5, clock=clock)
    policy.update_report("a", lora_report(90, 100, clock.now, slots=["sql", "chat"]))
    policy.update_report("b", lora_report(90, 100, clock.now))
    assert policy.lora_slots("a") == ["sql", "chat"]
    for index, name in enumerate(["math", "sql", "code"]):
        policy.reserve("a", f"r{index}", RoutingDemand(16, 16, lora_name=name))
    assert policy.lora_slots("a") == ["sql", "code"]  # the last two sent: chat and math evicted
    assert [policy.holds_lora("a", n) for n in ("chat", "math", "sql", "code")] == [False, False, True, True]
    # So math goes by headroom (b has more now), and the pair it forms there stays there.
    math = RoutingDemand(16, 16, lora_name="math")
    assert policy.decide(["a", "b"], math).replicas == ["b", "a"]
    policy.reserve("b", "r3", math)
    assert policy.decide(["a", "b"], math).replicas == ["b", "a"]
    # A replica that must load an adapter: the one with more free slots first (c 2, b 1 after math, a none), though
    # it has less room.
    policy.update_report("c", lora_report(50, 100, clock.now))
    assert policy.decide(["a", "b", "c"], RoutingDemand(16, 16, lora_name="new")).replicas == ["c", "b", "a"]
    # A report taken after the grace is the truth again (here a's step ran sql last).
    clock.now += 1.0
    policy.update_report("a", lora_report(90, 100, clock.now, slots=["code", "sql"]))
    assert policy.lora_slots("a") == ["code", "sql"]


def test_a_replica_just_sent_an_adapter_holds_it_until_a_report_taken_after_the_send(clock: FakeClock) -> None:
    """Between reports the router remembers where it sent an adapter's requests (they load it there), so the next
    ones follow instead of loading a copy on the replica with more room; a report taken transit_grace_s after the
    send says what the replica holds."""
    policy = FreeBlocksPolicy(transit_grace_s=0.5, clock=clock)
    policy.update_report("a", report(90, 100, clock.now))
    policy.update_report("b", report(60, 100, clock.now))
    sql = RoutingDemand(16, 16, lora_name="sql")
    assert policy.decide(["a", "b"], sql).replicas == ["a", "b"] and not policy.holds_lora("b", "sql")
    policy.reserve("b", "r1", sql)  # Ray sent it to b (a was busy, say)
    assert policy.holds_lora("b", "sql") and policy.decide(["a", "b"], sql).replicas == ["b", "a"]
    assert policy.decide(["a", "b"], RoutingDemand(16, 16, lora_name="chat")).replicas == ["a", "b"]
    clock.now += 0.2
    policy.update_report("b", report(58, 100, clock.now))  # may predate the request's arrival: still b
    assert policy.decide(["a", "b"], sql).replicas == ["b", "a"]
    clock.now += 0.5
    policy.update_report("b", report(58, 100, clock.now))  # after the grace and without sql: b does not hold it
    assert not policy.holds_lora("b", "sql") and policy.decide(["a", "b"], sql).replicas == ["a", "b"]


def test_unknown_replicas_are_tried_after_known_ones_with_room(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(5, 10, clock.now))
    assert policy.decide(["new", "a"], RoutingDemand(16, 0)).replicas == ["a", "new"]
    # A full known replica still leaves the unknown one to try, one request at a time.
    assert policy.decide(["new", "a"], RoutingDemand(160, 0)).replicas == ["new"]
    policy.reserve("new", "probe", RoutingDemand(160, 0))
    assert policy.decide(["new", "a"], RoutingDemand(160, 0)).kind == "wait"


def test_calls_without_demand_go_to_least_loaded(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.reserve("a", "x", None)
    for _ in range(5):
        assert policy.decide(["a", "b"], None).replicas == ["b", "a"]


def test_removed_replicas_are_forgotten(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(5, 10, clock.now))
    policy.reserve("a", "r", RoutingDemand(16, 0, prefix_key=1))
    policy.remove_replicas_except({"b"})
    assert policy.report("a") is None and policy.num_in_flight("a") == 0


def test_admission_queue_bound_and_timeout() -> None:
    clock = FakeClock()
    queue = AdmissionQueue(max_queued_requests=2, queue_timeout_s=5.0, clock=clock)
    assert queue.wait("r1") == "wait"
    assert queue.wait("r2") == "wait"
    assert queue.wait("r3") == "full"
    assert queue.wait("r1") == "wait"  # the same request retrying is not a new entry
    clock.now += 6
    assert queue.wait("r1") == "timed_out"
    assert queue.num_waiting == 1
    queue.leave("r2")
    assert queue.num_waiting == 0
    assert queue.wait("r3") == "wait"


def test_zero_queue_refuses_at_once() -> None:
    assert AdmissionQueue(0, 1.0).wait("r") == "full"


def test_report_within_transit_grace_does_not_count_the_request(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.5, clock=clock)
    policy.update_report("a", report(10, 10, clock.now - 1))
    policy.reserve("a", "r1", RoutingDemand(32, 0))  # 2 blocks
    policy.update_report("a", report(10, 10, clock.now + 0.1))  # the request may not have arrived yet
    assert policy.estimated_free_blocks("a") == 8
    policy.update_report("a", report(8, 10, clock.now + 0.6))
    assert policy.estimated_free_blocks("a") == 8
    # A report listing a request among those its replica received lately counts it, within the grace too.
    from dataclasses import replace

    clock.now += 1.0
    policy.reserve("a", "r2", RoutingDemand(32, 0))
    policy.update_report("a", report(8, 10, clock.now + 0.1))  # it has not arrived: still subtracted
    assert policy.estimated_free_blocks("a") == 6
    policy.update_report("a", replace(report(6, 10, clock.now + 0.2), recent_request_ids=frozenset({"r2"})))
    assert policy.estimated_free_blocks("a") == 6


def test_reservation_never_completed_expires(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, max_reservation_age_s=60.0, clock=clock)
    policy.update_report("a", report(10, 10, clock.now - 1))
    policy.reserve("a", "lost", RoutingDemand(16, 0))
    policy.update_report("a", report(10, 10, clock.now + 1))
    assert policy.num_in_flight("a") == 1
    policy.update_report("a", report(10, 10, clock.now + 61))
    assert policy.num_in_flight("a") == 0


def test_running_sums_match_the_reservations_through_any_sequence(clock: FakeClock) -> None:
    """The running sums that keep a decision O(replicas x keys) always equal a recount: per replica, the requests
    in flight are the reservations (an ended request keeps none), the blocks not counted by a report are the
    uncounted reservations', and each key holds the latest report's blocks for it plus its uncounted
    reservations' (a counted one adds nothing: the report holds it); `held_in_all` sums that over the replicas.
    Through random reserves, re-routes, releases, reports (with random blocks per key) and replica removals."""
    import random

    rng = random.Random(0)
    policy = FreeBlocksPolicy(RouterSettings(fair_share_window_s=10.0), transit_grace_s=0.5, max_reservation_age_s=30.0,
                              clock=clock)
    replicas, keys = ["a", "b", "c"], ["k1", "k2", "k3"]
    live = set(replicas)
    for replica in replicas:
        policy.update_report(replica, report(free=1000, total=1000, at=clock.now))
    ids = [f"r{i}" for i in range(40)]
    for _ in range(3000):
        clock.now += rng.choice([0.0, 0.1, 0.4, 1.0])
        op = rng.random()
        if op < 0.35:
            policy.reserve(rng.choice(sorted(live)), rng.choice(ids),
                           RoutingDemand(rng.randrange(1, 200), 16, api_key_name=rng.choice(keys)))
        elif op < 0.6:
            request_id = rng.choice(ids)
            policy.release(request_id)
            assert policy.reserved_replica(request_id) is None
        elif op < 0.9:
            replica = rng.choice(sorted(live))
            reported = {key: blocks for key in keys if (blocks := rng.choice([0, 0, rng.randrange(1, 300)]))}
            recent = frozenset(rng.sample(ids, 5))
            policy.update_report(replica, report(free=rng.randrange(1000), total=1000, at=clock.now - rng.random(),
                                                 blocks_by_key=reported, recent=recent))
        elif op < 0.95 and len(live) > 1:
            live.discard(rng.choice(sorted(live)))
            policy.remove_replicas_except(live)
        else:
            live = set(replicas)
            for replica in replicas:
                if policy.report(replica) is None:
                    policy.update_report(replica, report(free=1000, total=1000, at=clock.now))
        assert all(r.replica in live for r in policy._reservations.values())
        for replica in replicas:
            mine = [r for r in policy._reservations.values() if r.replica == replica]
            assert policy.num_in_flight(replica) == len(mine)
            reported = policy.report(replica)
            held = dict(reported.blocks_by_key) if reported is not None else {}
            for r in mine:
                if not r.is_counted_by_report and r.num_blocks:
                    held[r.api_key_name] = held.get(r.api_key_name, 0) + r.num_blocks
            assert policy.held_blocks(replica) == held
            pending = sum(r.num_blocks for r in mine if not r.is_counted_by_report)
            expected = None if reported is None else max(0, reported.num_free_blocks - pending)
            assert policy.estimated_free_blocks(replica) == expected
        for key in keys:
            assert policy.held_in_all(key) == sum(policy.held_blocks(replica).get(key, 0) for replica in replicas)


def test_a_key_flooding_through_one_ingress_is_seen_by_the_others_and_leaves_the_calm_keys_share(
        clock: FakeClock) -> None:
    """Two ingresses, each with its own policy, fed the same reports. The flood goes through A only, the calm key
    through B only. B sees the flood's blocks and demand from the reports; A learns from them that the calm key is
    active, so the flood's request that would take the calm key's block is turned back in A (`over_share`) and
    the calm key's request routes in B. A's own requests, once a report counts them, are not counted again."""
    settings = RouterSettings(fair_share_window_s=10.0)
    ingress_a = FreeBlocksPolicy(settings, transit_grace_s=0.5, clock=clock)
    ingress_b = FreeBlocksPolicy(settings, transit_grace_s=0.5, clock=clock)

    def both(replica_report: ReplicaReport) -> None:
        for policy in (ingress_a, ingress_b):
            policy.update_report("a", replica_report)

    flood, calm = RoutingDemand(8, 120, api_key_name="flood"), RoutingDemand(8, 4, api_key_name="calm")  # 8, 1
    both(report(40, 40, clock.now))
    assert ingress_b.decide(["a"], calm).kind == "route"
    ingress_b.reserve("a", "calm-0", calm)
    for index in range(4):  # A has not seen the calm key yet: nothing is owed to it there
        assert ingress_a.decide(["a"], flood).kind == "route"
        ingress_a.reserve("a", f"flood-{index}", flood)
    assert ingress_b.held_blocks("a") == {"calm": 1} and ingress_b.held_in_all("flood") == 0

    clock.now += 1.0
    both(report(7, 40, clock.now, blocks_by_key={"calm": 1, "flood": 32},
                recent=frozenset({"calm-0", "flood-0", "flood-1", "flood-2", "flood-3"})))
    for policy in (ingress_a, ingress_b):  # the same view in both; A's reservations are in the report, once
        assert policy.held_blocks("a") == {"calm": 1, "flood": 32} and policy.held_in_all("flood") == 32
        assert policy.estimated_free_blocks("a") == 7
    assert ingress_b.shares.active_demands()["flood"] == 32

    ingress_b.release("calm-0")  # ended: the latest report still holds its block, in both
    assert ingress_b.held_blocks("a") == {"calm": 1, "flood": 32} and ingress_b.num_in_flight("a") == 0
    clock.now += 1.0
    both(report(8, 40, clock.now, blocks_by_key={"flood": 32}))  # taken after its end: it is gone
    assert ingress_a.held_blocks("a") == ingress_b.held_blocks("a") == {"flood": 32}
    # The calm key, active within the window, is owed its block in A too: the flood may not take it.
    assert ingress_a.decide(["a"], flood).kind == "over_share"
    assert ingress_b.decide(["a"], calm).replicas == ["a"]
    # A key known only from the reports is forgotten like any other once idle past the window.
    clock.now += 11
    both(report(8, 40, clock.now, blocks_by_key={"flood": 32}))
    assert ingress_a.decide(["a"], flood).kind == "route"


def test_a_reservation_counts_once_before_and_after_a_report_counts_it(clock: FakeClock) -> None:
    """What a key holds on a replica is the report's blocks for it plus this router's reservations the report
    has not counted: a report counting some of them (listed as received, or past the transit grace) takes them
    out of the router's part as its own part grows; a request that ends uncounted goes at once, one that ends
    counted stays in the report's part until the next report."""
    policy = FreeBlocksPolicy(RouterSettings(fair_share_window_s=10.0), transit_grace_s=0.5, clock=clock)
    policy.update_report("a", report(40, 40, clock.now, blocks_by_key={"other": 4}))  # another ingress's request
    demand = RoutingDemand(8, 24, api_key_name="k")  # 2 blocks
    for index in range(3):
        policy.reserve("a", f"r{index}", demand)
    assert policy.held_blocks("a") == {"other": 4, "k": 6} and policy.held_in_all("k") == 6
    clock.now += 0.2  # within the grace: only the listed request is counted
    policy.update_report("a", report(34, 40, clock.now, blocks_by_key={"other": 4, "k": 2}, recent=frozenset({"r0"})))
    assert policy.held_blocks("a") == {"other": 4, "k": 6} and policy.estimated_free_blocks("a") == 30
    policy.release("r2")  # never counted: it held nothing the report shows
    assert policy.held_blocks("a") == {"other": 4, "k": 4} and policy.held_in_all("k") == 4
    clock.now += 1.0  # past the grace: r1 is counted too
    policy.update_report("a", report(32, 40, clock.now, blocks_by_key={"other": 4, "k": 4}))
    assert policy.held_blocks("a") == {"other": 4, "k": 4} and policy.estimated_free_blocks("a") == 32
    policy.release("r0")
    assert policy.held_in_all("k") == 4  # counted: the report still holds it
    clock.now += 1.0
    policy.update_report("a", report(34, 40, clock.now, blocks_by_key={"other": 4, "k": 2}))
    assert policy.held_blocks("a") == {"other": 4, "k": 2} and policy.num_in_flight("a") == 1
    policy.remove_replicas_except(set())
    assert policy.held_in_all("k") == policy.held_in_all("other") == 0


def test_a_key_whose_short_requests_end_between_reports_is_owed_its_share_through_other_ingresses(
        clock: FakeClock) -> None:
    """The calm key sends short requests through ingress B only; each ends before any report holds it, so the
    reports show it only in the replica's recent peaks. Ingress A, which the flood goes through, still owes the
    calm key its block (turns the flood back) while the peak is within the window, and routes the flood once the
    replica no longer reports it."""
    settings = RouterSettings(fair_share_window_s=10.0)
    ingress_a = FreeBlocksPolicy(settings, transit_grace_s=0.5, clock=clock)
    flood = RoutingDemand(8, 120, api_key_name="flood")  # 8 blocks
    ingress_a.update_report("a", report(40, 40, clock.now))
    for index in range(4):
        ingress_a.reserve("a", f"flood-{index}", flood)
    clock.now += 1.0
    ingress_a.update_report("a", report(8, 40, clock.now, blocks_by_key={"flood": 32}, peaks={"flood": 32, "calm": 1}))
    assert ingress_a.shares.active_demands() == {"flood": 32, "calm": 1}
    assert ingress_a.decide(["a"], flood).kind == "over_share"  # 8 free, the calm key owed 1
    clock.now += 11  # the replica's window passed with no calm request: no peak reported for it
    ingress_a.update_report("a", report(8, 40, clock.now, blocks_by_key={"flood": 32}, peaks={"flood": 32}))
    assert ingress_a.decide(["a"], flood).kind == "route"


def test_blocks_by_key_are_read_from_the_replicas_stats() -> None:
    stats = {"num_free_blocks": 30, "num_total_blocks": 64, "block_size": 16}
    assert ReplicaReport.from_routing_stats(stats).blocks_by_key == {}  # a replica that does not send them
    assert ReplicaReport.from_routing_stats(stats).peak_blocks_by_key == {}
    read = ReplicaReport.from_routing_stats({**stats, "blocks_by_key": {"a": 30, "b": 4, "c": 0},
                                             "peak_blocks_by_key": {"a": 34, "d": 2}})
    assert read.blocks_by_key == {"a": 30, "b": 4} and read.peak_blocks_by_key == {"a": 34, "d": 2}


def test_a_stream_channel_goes_to_the_replica_it_names_or_fails_as_lost() -> None:
    import asyncio
    from types import SimpleNamespace

    from pagedserve.serve_app.errors import ChannelLostError
    from pagedserve.serve_app.messages import ChannelOpen
    from pagedserve.serve_app.router import FreeBlocksRequestRouter

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=name)) for name in ("a", "b")]

    async def route(target: str) -> tuple[list, asyncio.Future]:
        pending = SimpleNamespace(future=asyncio.get_running_loop().create_future())
        return FreeBlocksRequestRouter._route_channel(None, ChannelOpen("ingress", target), replicas, pending), \
            pending.future

    ranked, future = asyncio.run(route("b"))
    assert ranked == [[replicas[1]]] and not future.done()
    ranked, future = asyncio.run(route("gone"))
    assert isinstance(future.exception(), ChannelLostError) and ranked == [replicas]


def test_a_request_that_completed_before_ray_reports_it_routed_is_not_reserved_again() -> None:
    """Ray calls `on_request_routed` once the replica accepted the request, and a short request's completion
    (`on_request_completed`) can be handled first: the reservation must not come back, never to be released
    (it held blocks, and a key's share, for an hour). A request Ray sent elsewhere than reserved moves."""
    import time
    from types import SimpleNamespace

    from pagedserve.serve_app.router import FreeBlocksRequestRouter

    router = object.__new__(FreeBlocksRequestRouter)  # no Ray: the adapter's bookkeeping only
    router.initialize_state()
    router.policy.update_report("a", report(40, 40, time.time()))
    router.policy.update_report("b", report(40, 40, time.time()))
    demand = RoutingDemand(8, 4, api_key_name="calm")

    def pending(request_id: str) -> SimpleNamespace:
        return SimpleNamespace(args=[SimpleNamespace(routing_demand=demand)],
                               metadata=SimpleNamespace(internal_request_id=request_id))

    router.policy.reserve("a", "short", demand)
    router.on_request_completed("a", "short")
    router.on_request_routed(pending("short"), "a", None)
    assert router.policy.num_in_flight("a") == 0 and router.policy.held_blocks("a") == {}
    router.policy.reserve("a", "moved", demand)
    router.on_request_routed(pending("moved"), "b", None)
    assert router.policy.reserved_replica("moved") == "b" and router.policy.held_blocks("a") == {}
