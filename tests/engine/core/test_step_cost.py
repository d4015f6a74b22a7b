"""The step cost model as pure arithmetic: synthetic step times in, fitted costs and prompt-token budgets out."""

from __future__ import annotations

import random

import pytest

from pagedserve.engine.core.step_cost import (
    PRIOR_STEP_COSTS,
    StepCostModel,
    StepCosts,
    StepShape,
    prompt_tokens_to_drain,
    prompt_tokens_within_ratio,
)

# A machine unlike the prior's: everything 3-10x dearer, eager steps 8 ms above graph replays.
TRUE_COSTS = StepCosts(graph_step_s=0.012, eager_step_s=0.020, per_seq_s=2e-4, per_context_token_s=1e-7,
                       per_prompt_token_s=8e-5)


def true_step_s(model: StepCostModel, shape: StepShape) -> float:
    return TRUE_COSTS.step_s(shape.num_seqs, shape.num_decode_context_tokens, shape.num_prompt_tokens,
                             model.runs_graph(shape))


def serve(model: StepCostModel, num_steps: int, rng: random.Random, noise: float = 0.03,
          costs: StepCosts = TRUE_COSTS) -> None:
    """Steps as a server runs them: mostly decodes of 1..200 sequences, a third with prompt chunks beside."""
    for _ in range(num_steps):
        num_seqs = rng.randint(1, 200)
        context = num_seqs * rng.randint(100, 2000)
        prompt = rng.choice([0, 0, rng.randint(16, 2048)])
        shape = StepShape(num_seqs, context, prompt)
        exact = costs.step_s(num_seqs, context, prompt, model.runs_graph(shape))
        model.observe(shape, exact * rng.gauss(1.0, noise))


def test_the_fit_finds_the_costs_of_a_machine_far_from_the_prior():
    model = StepCostModel(decode_graph_max_batch_size=128)
    assert model.costs() == PRIOR_STEP_COSTS  # before any step
    serve(model, 400, random.Random(0))
    for shape in (StepShape(8, 8000), StepShape(100, 120000), StepShape(180, 200000), StepShape(8, 8000, 256),
                  StepShape(100, 120000, 2000)):
        assert model.predict(shape) == pytest.approx(true_step_s(model, shape), rel=0.03), shape
    costs = model.costs()
    assert costs.per_prompt_token_s == pytest.approx(TRUE_COSTS.per_prompt_token_s, rel=0.05)
    assert costs.eager_step_s - costs.graph_step_s == pytest.approx(0.008, abs=0.002)


def test_outliers_barely_move_it_and_old_steps_are_forgotten():
    rng = random.Random(1)
    model = StepCostModel(decode_graph_max_batch_size=128, memory_steps=128)
    # Among the very first steps (the scale is not known yet): two of them 50x slow.
    for index in range(16):
        shape = StepShape(10 + index, 5000 * (index + 1), 300 * (index % 3))
        model.observe(shape, true_step_s(model, shape) * (50 if index in (3, 9) else 1))
    for shape in (StepShape(20, 55000), StepShape(20, 55000, 300)):  # like those steps (they tell no more)
        assert model.predict(shape) == pytest.approx(true_step_s(model, shape), rel=0.02)
    serve(model, 200, rng, noise=0.0)
    shape = StepShape(64, 64000)
    before = model.predict(shape)
    for _ in range(5):  # a compile, an autotune, a collector pause: 100x the step
        model.observe(shape, 100 * before)
    assert model.predict(shape) == pytest.approx(before, rel=0.05)
    # The machine (or the operating point) changes: twice as slow everywhere. The fit follows within a few memories.
    slower = StepCosts(*(2 * value for value in TRUE_COSTS.as_vector()))
    serve(model, 600, rng, noise=0.0, costs=slower)
    assert model.predict(shape) == pytest.approx(2 * true_step_s(model, shape), rel=0.05)


def test_what_the_steps_cannot_tell_stays_at_the_prior_scaled_to_the_machine():
    model = StepCostModel()  # no CUDA graphs (a CPU): the graph step's cost is never seen
    serve(model, 200, random.Random(2))
    costs = model.costs()
    # This machine's steps take 3-10x the prior's: the unseen cost is the prior's, scaled by the first steps.
    assert 3 < costs.graph_step_s / PRIOR_STEP_COSTS.graph_step_s < 10
    assert costs.eager_step_s == pytest.approx(TRUE_COSTS.eager_step_s, rel=0.1)
    # Nonsense times and empty steps teach nothing (speculative steps do: tests/engine/spec/test_adaptive.py).
    observed = model.num_observed
    model.observe(StepShape(4, 400), 0.0)
    model.observe(StepShape(0, 0), 1.0)
    assert model.num_observed == observed


def test_prompt_tokens_within_ratio_and_to_drain():
    costs = StepCosts(graph_step_s=0.004, eager_step_s=0.010, per_seq_s=1e-4, per_context_token_s=0.0,
                      per_prompt_token_s=2e-5)
    # 60 decodes replayed from a graph: 4 + 6 = 10 ms; ratio 2 leaves 10 ms of prompt tokens, 500 of them.
    assert prompt_tokens_within_ratio(costs, 60, 0, True, 2.0) == pytest.approx(500)
    assert prompt_tokens_within_ratio(costs, 60, 0, True, 3.0) == pytest.approx(1000)
    assert prompt_tokens_within_ratio(costs, 60, 0, False, 2.0) == pytest.approx(800)  # eager decodes: 16 ms
    assert prompt_tokens_within_ratio(costs, 60, 0, True, 1.0) == 0
    # Draining 1,000 tokens within 0.1 s in steps of 10 ms + 20 us a token: (1000 / P) (0.01 + 2e-5 P) <= 0.1.
    tokens = prompt_tokens_to_drain(costs, 0.010, 1000, 0.1)
    assert tokens == pytest.approx(125)
    assert (1000 / tokens) * (0.010 + 2e-5 * tokens) == pytest.approx(0.1)
    assert prompt_tokens_to_drain(costs, 0.010, 1000, 0.02) == float("inf")  # 1,000 tokens alone take 20 ms
    assert prompt_tokens_to_drain(costs, 0.010, 1000, -1.0) == float("inf")  # the deadline has passed
    assert prompt_tokens_to_drain(costs, 0.010, 0, 0.1) == 0


def test_steps_with_prompt_tokens_count_as_graph_steps_within_the_mixed_graphs_tokens() -> None:
    """Decode-only steps replay a graph up to the decode graphs' batch; steps with prompt tokens (verification rows
    beside them included) up to the mixed-step graphs' token count; past either, or with none captured, eager."""
    model = StepCostModel(decode_graph_max_batch_size=8, mixed_graph_max_tokens=64)
    assert model.runs_graph(StepShape(num_seqs=8, num_decode_context_tokens=100))
    assert not model.runs_graph(StepShape(num_seqs=9, num_decode_context_tokens=100))
    assert model.runs_graph(StepShape(num_seqs=4, num_decode_context_tokens=100, num_prompt_tokens=60))
    assert not model.runs_graph(StepShape(num_seqs=4, num_decode_context_tokens=100, num_prompt_tokens=61))
    assert model.runs_graph(StepShape(num_seqs=4, num_prompt_tokens=50, num_draft_tokens=10))
    assert not model.runs_graph(StepShape(num_seqs=4, num_prompt_tokens=50, num_draft_tokens=11))
    assert not StepCostModel(decode_graph_max_batch_size=8).runs_graph(StepShape(num_seqs=1, num_prompt_tokens=8))
