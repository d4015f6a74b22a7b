"""Pure router policy: placement by free blocks, optimistic accounting, affinity, admission queue. No Ray."""

from __future__ import annotations

import pytest
from pagedserve.config.serve import RouterSettings
from pagedserve.serve_app.messages import ReplicaReport, RoutingDemand
from pagedserve.serve_app.router import AdmissionQueue, FreeBlocksPolicy


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def report(free: int, total: int, at: float, block_size: int = 16) -> ReplicaReport:
    return ReplicaReport(num_free_blocks=free, num_total_blocks=total, block_size=block_size, report_time_s=at)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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
    policy.release("r2")  # finished before any report saw it: stays reserved until one does
    assert policy.estimated_free_blocks("a") == 0
    assert policy.num_in_flight("a") == 1
    # A report taken after r1 was sent counts r1 itself: no double subtraction.
    clock.now += 1.0
    policy.update_report("a", report(7, 10, clock.now - 0.5))
    assert policy.estimated_free_blocks("a") == 7
    assert policy.num_in_flight("a") == 1  # r2 forgotten
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


def test_lora_requests_go_first_to_replicas_holding_the_adapter(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, clock=clock)
    policy.update_report("a", report(90, 100, clock.now))
    policy.update_report("b", ReplicaReport.from_routing_stats({
        "num_free_blocks": 20, "num_total_blocks": 100, "block_size": 16, "report_time_s": clock.now,
        "lora_names": ["sql"]}))
    policy.update_report("c", report(10, 100, clock.now))
    assert policy.decide(["a", "b", "c"], RoutingDemand(16, 16, lora_name="sql")).replicas == ["b", "a", "c"]
    # A replica without room is not chosen for holding the adapter; the base model ignores adapters.
    assert policy.decide(["a", "b"], RoutingDemand(16, 400, lora_name="sql")).replicas == ["a"]
    assert policy.decide(["a", "b"], RoutingDemand(16, 16)).replicas == ["a", "b"]
    assert policy.holds_lora("b", "sql") and not policy.holds_lora("a", "sql")  # the hit/miss metric's test


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


def test_reservation_never_completed_expires(clock: FakeClock) -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0, max_reservation_age_s=60.0, clock=clock)
    policy.update_report("a", report(10, 10, clock.now - 1))
    policy.reserve("a", "lost", RoutingDemand(16, 0))
    policy.update_report("a", report(10, 10, clock.now + 1))
    assert policy.num_in_flight("a") == 1
    policy.update_report("a", report(10, 10, clock.now + 61))
    assert policy.num_in_flight("a") == 0


def test_running_sums_match_the_reservations_through_any_sequence(clock: FakeClock) -> None:
    """The per-replica sums that keep a decision O(replicas) always equal a recount of the reservations
    (blocks not yet counted by a report, requests not finished), through random reserves, re-routes,
    releases, reports and replica removals."""
    import random

    rng = random.Random(0)
    policy = FreeBlocksPolicy(transit_grace_s=0.5, max_reservation_age_s=30.0, clock=clock)
    replicas = ["a", "b", "c"]
    live = set(replicas)
    for replica in replicas:
        policy.update_report(replica, report(free=1000, total=1000, at=clock.now))
    ids = [f"r{i}" for i in range(40)]
    for _ in range(3000):
        clock.now += rng.choice([0.0, 0.1, 0.4, 1.0])
        op = rng.random()
        if op < 0.35:
            policy.reserve(rng.choice(sorted(live)), rng.choice(ids), RoutingDemand(rng.randrange(1, 200), 16))
        elif op < 0.6:
            policy.release(rng.choice(ids))
        elif op < 0.9:
            replica = rng.choice(sorted(live))
            policy.update_report(replica, report(free=rng.randrange(1000), total=1000, at=clock.now - rng.random()))
        elif op < 0.95 and len(live) > 1:
            live.discard(rng.choice(sorted(live)))
            policy.remove_replicas_except(live)
        else:
            live = set(replicas)
            for replica in replicas:
                if policy.report(replica) is None:
                    policy.update_report(replica, report(free=1000, total=1000, at=clock.now))
        for replica in replicas:
            mine = [r for r in policy._reservations.values() if r.replica == replica]
            assert all(r.replica in live for r in policy._reservations.values())
            assert policy.num_in_flight(replica) == sum(not r.is_finished for r in mine)
            pending = sum(r.num_blocks for r in mine if not r.is_counted_by_report)
            reported = policy.report(replica)
            expected = None if reported is None else max(0, reported.num_free_blocks - pending)
            assert policy.estimated_free_blocks(replica) == expected


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
