"""The step-time budget (`prefill_step_time_ratio`) through the scheduler: synthetic step times teach its cost
model, a fake clock ages the prompts, and the prompt chunks beside decodes are what the rule allows."""

from __future__ import annotations

import random

import pytest

from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.config.resolve import SchedulerSettings
from pagedserve.engine.core.request import Request, SamplingParams
from pagedserve.engine.core.scheduler import MIN_PREFILL_TOKENS_PER_STEP, Scheduler
from pagedserve.engine.core.step_cost import StepCostModel, StepCosts, StepShape

# What the synthetic machine's steps cost: a decode-only step of n sequences replays a graph in 4 ms + 0.1 ms a
# sequence; a step with prompt tokens runs eager, 2 ms dearer, + 20 us a prompt token.
COSTS = StepCosts(graph_step_s=0.004, eager_step_s=0.006, per_seq_s=1e-4, per_context_token_s=0.0,
                  per_prompt_token_s=2e-5)
NUM_DECODES = 4
DECODE_STEP_S = 0.004 + NUM_DECODES * 1e-4  # 4.4 ms: (ratio - 1) x this is the prompt tokens' time
MIXED_STEP_WITHOUT_PROMPT_S = 0.006 + (NUM_DECODES + 1) * 1e-4  # 6.5 ms


def make(ratio: float | None = 2.0, bound: int | None = 2048, ttft_target_s: float = 0.5):
    """A scheduler whose cost model has seen 256 steps of COSTS, with NUM_DECODES requests decoding; and its clock."""
    clock = [1000.0]
    kv = KVCacheManager(16, [None], [4096], enable_prefix_caching=False)
    config = SchedulerSettings(64, 4096, 8192, max_prefill_tokens_while_decoding=bound, prefill_step_time_ratio=ratio,
                               ttft_target_s=ttft_target_s)
    model = StepCostModel(decode_graph_max_batch_size=32)
    scheduler = Scheduler(config, kv, model, clock=lambda: clock[0])
    rng = random.Random(0)
    for _ in range(256):
        num_seqs = rng.randint(1, 64)
        shape = StepShape(num_seqs, num_seqs * rng.randint(16, 2000), rng.choice([0, rng.randint(16, 2048)]))
        scheduler.observe_step(shape, COSTS.step_s(shape.num_seqs, shape.num_decode_context_tokens,
                                                   shape.num_prompt_tokens, model.runs_graph(shape)))
    for index in range(NUM_DECODES):
        scheduler.add_request(prompt(f"d{index}", 16, clock[0]))
    step(scheduler)  # their prompts (no decodes yet: the whole budget); they decode from now on
    return scheduler, clock


def prompt(name: str, num_tokens: int, arrival_time: float) -> Request:
    return Request(name, [7] * num_tokens, SamplingParams(max_tokens=64), arrival_time=arrival_time)


def step(scheduler: Scheduler) -> list[tuple[str, int]]:
    out = scheduler.schedule()
    scheduler.finish_step(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.request.output_token_ids.append(5)
    return [(chunk.request.request_id, chunk.num_new_tokens) for chunk in out.chunks]


def prompt_chunk(scheduler: Scheduler, name: str = "p") -> int:
    chunks = dict(step(scheduler))
    assert all(chunks[f"d{index}"] == 1 for index in range(NUM_DECODES))  # the decodes go on beside it
    return chunks.get(name, 0)


@pytest.mark.parametrize("ratio", [2.0, 3.0])
def test_prompt_tokens_beside_decodes_take_ratio_minus_one_decode_steps(ratio):
    scheduler, clock = make(ratio)
    scheduler.add_request(prompt("p", 3000, clock[0]))
    expected = (ratio - 1) * DECODE_STEP_S / COSTS.per_prompt_token_s  # 220 and 440 tokens
    assert prompt_chunk(scheduler) == pytest.approx(expected, rel=0.02)
    assert prompt_chunk(scheduler) == pytest.approx(expected, rel=0.02)  # the next chunk likewise
    # The constant bound caps the rule; off, the bound alone.
    scheduler.config = scheduler.config.updated(max_prefill_tokens_while_decoding=100)
    assert prompt_chunk(scheduler) == 100
    scheduler.config = scheduler.config.updated(max_prefill_tokens_while_decoding=1000, prefill_step_time_ratio=None)
    assert prompt_chunk(scheduler) == 1000


def test_prompts_always_progress_by_the_floor():
    scheduler, clock = make(ratio=1.0)  # no time at all for prompt tokens
    scheduler.add_request(prompt("p", 3000, clock[0]))
    assert prompt_chunk(scheduler) == MIN_PREFILL_TOKENS_PER_STEP
    scheduler.config = scheduler.config.updated(max_prefill_tokens_while_decoding=16)
    assert prompt_chunk(scheduler) == 16  # never past the constant bound


@pytest.mark.parametrize(("age_s", "expected"), [
    (0.3, 220),  # 0.2 s left for 3,000 tokens: 139 a step would do; the ratio's 220 stand
    (0.4, MIXED_STEP_WITHOUT_PROMPT_S * 3000 / (0.1 - 3000 * 2e-5)),  # 0.1 s left: 488 a step
    (0.46, 2048),  # 40 ms left: 3,000 tokens take 60 ms in any steps; the constant bound
])
def test_the_budget_widens_as_the_oldest_prompt_nears_its_deadline(age_s, expected):
    scheduler, clock = make(ratio=2.0)
    scheduler.add_request(prompt("p", 3000, clock[0] - age_s))
    assert prompt_chunk(scheduler) == pytest.approx(expected, rel=0.02)


def test_a_burst_widens_it_through_the_deadlines_behind_the_head():
    scheduler, clock = make(ratio=1.0)
    # Ten prompts of 400 tokens that arrived 0.3 s ago: the head alone would make 0.5 s by the floor; the tenth
    # needs 4,000 tokens within 0.2 s.
    for index in range(10):
        scheduler.add_request(prompt(f"p{index}", 400, clock[0] - 0.3))
    expected = MIXED_STEP_WITHOUT_PROMPT_S * 4000 / (0.2 - 4000 * 2e-5)
    assert sum(n for name, n in step(scheduler) if name.startswith("p")) == pytest.approx(expected, rel=0.02)
    # A preempted request's recompute is due from its last token, not from its arrival long ago.
    scheduler, clock = make(ratio=1.0)
    recompute = prompt("p", 400, clock[0] - 60.0)
    recompute.metrics.last_token_time = clock[0]
    scheduler.add_request(recompute)
    assert prompt_chunk(scheduler) == MIN_PREFILL_TOKENS_PER_STEP
