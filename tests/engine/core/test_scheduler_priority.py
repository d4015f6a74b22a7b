"""The `priority` scheduling policy as pure logic (vLLM's semantics: lower priority value served earlier, FIFO
within a level; admission and preemption by it); no model."""

from __future__ import annotations

import random
import statistics

from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.config.resolve import SchedulerSettings
from pagedserve.engine.core.request import FinishReason, Request, RequestStatus, SamplingParams
from pagedserve.engine.core.scheduler import Scheduler


def make(num_blocks=32, block_size=4, max_batch_tokens=16, max_num_seqs=8, policy="priority"):
    kv = KVCacheManager(block_size, [None], [num_blocks], enable_prefix_caching=True)
    return Scheduler(SchedulerSettings(max_num_seqs, max_batch_tokens, 256, policy=policy), kv), kv


def run_step(scheduler: Scheduler, token: int = 5):
    """Schedule, pretend the model ran, append one token to every sampling chunk."""
    out = scheduler.schedule()
    scheduler.finish_step(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.request.output_token_ids.append(token)
    scheduler.kv_cache.check_invariants()
    return out


def request(name: str, num_prompt: int, priority: int = 0, arrival: float = 0.0, max_tokens: int = 8) -> Request:
    return Request(name, list(range(10, 10 + num_prompt)), SamplingParams(max_tokens=max_tokens),
                   arrival_time=arrival, priority=priority)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def test_admits_by_priority_then_arrival():
    scheduler, _ = make(max_num_seqs=2, max_batch_tokens=64, policy="priority")
    for name, priority, arrival in [("late-low", 5, 1.0), ("low", 5, 0.0), ("high", -1, 3.0), ("mid", 0, 2.0)]:
        scheduler.add_request(request(name, 4, priority, arrival))
    assert ids(scheduler.waiting) == ["high", "mid", "low", "late-low"]
    out = run_step(scheduler)
    assert ids(c.request for c in out.chunks) == ["high", "mid"]


def test_fifo_ignores_priority():
    scheduler, _ = make(max_num_seqs=1, max_batch_tokens=64, policy="fifo")
    scheduler.add_request(request("first", 4, priority=9, arrival=0.0))
    scheduler.add_request(request("urgent", 4, priority=-9, arrival=1.0))
    assert ids(c.request for c in run_step(scheduler).chunks) == ["first"]


def test_out_of_blocks_preempts_the_lowest_priority_not_the_newest():
    scheduler, _ = make(num_blocks=6, block_size=4, max_batch_tokens=64, policy="priority")
    low, high = request("low", 8, priority=1, arrival=0.0), request("high", 8, priority=0, arrival=1.0)
    scheduler.add_request(low)
    scheduler.add_request(high)
    run_step(scheduler)  # 2 + 2 blocks of 6
    preempted = []
    for _ in range(6):
        preempted += ids(run_step(scheduler).preempted)
    assert preempted and set(preempted) == {"low"}  # fifo would have preempted "high", the newer one
    assert high.status is RequestStatus.RUNNING and high.num_output_tokens == 7


def test_better_arrival_preempts_a_worse_running_request_for_a_slot():
    scheduler, kv = make(max_num_seqs=2, max_batch_tokens=64, policy="priority")
    background = [request(f"bg{i}", 4, priority=3, arrival=float(i)) for i in range(2)]
    for r in background:
        scheduler.add_request(r)
    run_step(scheduler)
    run_step(scheduler)
    same = request("same", 4, priority=3, arrival=5.0)
    scheduler.add_request(same)
    assert not run_step(scheduler).preempted, "an equal priority waits its turn"
    urgent = request("urgent", 4, priority=0, arrival=6.0)
    scheduler.add_request(urgent)
    out = run_step(scheduler)
    assert ids(out.preempted) == ["bg1"]  # the worst running one: lowest priority, then newest
    assert "urgent" in ids(c.request for c in out.chunks)
    # Back in the queue by (priority, arrival): ahead of the later arrival of its level.
    assert ids(scheduler.waiting) == ["bg1", "same"]
    kv.check_invariants()


def test_better_arrival_preempts_for_blocks():
    scheduler, _ = make(num_blocks=4, block_size=4, max_batch_tokens=64, policy="priority")
    hog = request("hog", 12, priority=2, max_tokens=2)  # 3 blocks, then 4 with its output
    scheduler.add_request(hog)
    run_step(scheduler)
    urgent = request("urgent", 8, priority=0, arrival=1.0)
    scheduler.add_request(urgent)
    out = run_step(scheduler)
    assert ids(out.preempted) == ["hog"] and ids(c.request for c in out.chunks) == ["urgent"]


def test_switching_to_priority_at_run_time_orders_the_queue():
    scheduler, _ = make(max_num_seqs=1, max_batch_tokens=64, policy="fifo")
    for name, priority, arrival in [("a", 2, 0.0), ("b", 1, 1.0), ("c", 0, 2.0)]:
        scheduler.add_request(request(name, 4, priority, arrival))
    scheduler.config = scheduler.config.updated(policy="priority")
    out = run_step(scheduler)
    assert ids(c.request for c in out.chunks) == ["c"] and ids(scheduler.waiting) == ["b", "a"]


def test_under_saturation_high_priority_ttft_is_a_fraction_of_low():
    """Issue 28's bar, in steps: a saturated scheduler (arrivals above what it finishes), half the requests at
    priority 0 and half at 1; high-priority TTFT p50 at most a third of low-priority's."""
    rng = random.Random(0)
    scheduler, kv = make(num_blocks=64, block_size=4, max_batch_tokens=48, max_num_seqs=8, policy="priority")
    arrived_step: dict[str, int] = {}
    ttft_steps: dict[str, int] = {}
    for step in range(400):
        for index in range(2 if step < 300 else 0):  # 2 arrivals a step; ~1 finishes a step at 8 running
            name = f"s{step}-{index}"
            priority = rng.choice([0, 1])
            scheduler.add_request(request(f"{name}-p{priority}", rng.randint(4, 12), priority, arrival=step + index / 10,
                                          max_tokens=8))
            arrived_step[f"{name}-p{priority}"] = step
        out = run_step(scheduler)
        for chunk in out.chunks:
            request_ = chunk.request
            if chunk.samples and request_.request_id not in ttft_steps:
                ttft_steps[request_.request_id] = step - arrived_step[request_.request_id]
            if request_.num_output_tokens >= 8:
                scheduler.finish_request(request_, FinishReason.LENGTH)
    kv.check_invariants()
    high = [t for name, t in ttft_steps.items() if name.endswith("p0")]
    low = [t for name, t in ttft_steps.items() if name.endswith("p1")]
    assert len(high) > 100 and len(low) > 20
    assert statistics.median(high) <= statistics.median(low) / 3
