"""Adaptive speculation (engine/spec/adaptive.py): the plan against a brute-force optimum on synthetic costs, the
crossover found by calibrating the step cost model on a simulated machine, probes of collapsed requests; then
through the engine on the tiny model: a rule that flips speculation on and off mid-request leaves every output as
plain decoding's, and the real rule's decisions reach the stats."""

from __future__ import annotations

import itertools
import random

import pytest

from pagedserve.engine.core.request import SamplingParams
from pagedserve.engine.core.step_cost import StepCostModel, StepCosts, StepShape
from pagedserve.engine.llm import LLM
from pagedserve.engine.spec.adaptive import PROBE_INTERVAL_STEPS, SpeculationPlan, SpeculationRule

# A GPU-like machine: decode and verification steps replay graphs; a verification step pays 0.1 ms a sequence for
# its padded rows and 20 us a proposal (compute bound enough that large batches should not speculate).
GPU_LIKE = StepCosts(graph_step_s=4.5e-3, eager_step_s=7e-3, per_seq_s=3.5e-5, per_context_token_s=2.5e-8,
                     per_prompt_token_s=2.3e-5, serial_step_s=4e-4, spec_step_s=3e-4, spec_per_seq_s=1e-4,
                     per_draft_token_s=2e-5)


def fixed_model(costs: StepCosts, graphs: int = 64) -> StepCostModel:
    """A cost model that has observed nothing: it predicts with `costs` (its prior)."""
    return StepCostModel(prior=costs, decode_graph_max_batch_size=graphs, verify_graph_max_batch_size=graphs)


def expected_rate(costs: StepCosts, model: StepCostModel, batch: StepShape, in_flight: bool,
                  estimates: dict[str, tuple[float, float]], plan: dict[str, int]) -> float:
    """Expected committed tokens per second of a plan (docs/speculative.md's formula, written out again)."""
    plain = StepShape(batch.num_seqs, batch.num_decode_context_tokens, is_serial=not in_flight)
    if not plan:
        return batch.num_seqs / costs.shape_s(plain, model.runs_graph(plain))
    tokens = float(batch.num_seqs)
    drafts = 0.0
    for request_id, count in plan.items():
        p, q = estimates[request_id]
        tokens += q * sum(p ** j for j in range(1, count + 1))
        drafts += q * count
    verify = StepShape(batch.num_seqs, batch.num_decode_context_tokens, num_draft_tokens=1)
    seconds = (costs.step_s(batch.num_seqs, batch.num_decode_context_tokens, 0, model.runs_graph(verify))
               + costs.serial_step_s * (2 if in_flight else 1) + costs.spec_step_s
               + costs.spec_per_seq_s * batch.num_seqs + costs.per_draft_token_s * drafts)
    return tokens / seconds


def teach(rule: SpeculationRule, request_id: str, p: float, q: float, num_asks: int = 40) -> None:
    """Asks with proposals every 1/q-th time, each accepting a of 16 and rejecting the next (a / (a + 1) = p)."""
    for index in range(num_asks):
        if index % round(1 / q):
            rule.record(request_id, 0, 0)
        else:
            rule.record(request_id, 16, round(p / (1 - p)))


def test_the_plan_is_the_best_plan_by_brute_force():
    """Random batches of 1-3 requests with random acceptance, on random machines: the plan's expected tokens per
    second equal the best of every (k'_1, ..., k'_n) in 0..k, including plain decoding; k' below k is chosen."""
    rng = random.Random(0)
    k = 3
    num_trimmed = num_plain = num_spec = 0
    for trial in range(300):
        costs = StepCosts(*(value * rng.uniform(0.2, 5.0) for value in GPU_LIKE.as_vector()))
        model = fixed_model(costs, graphs=rng.choice([0, 64]))
        rule = SpeculationRule(k, probe_interval_steps=10**9)
        num_seqs = rng.randint(1, 3)
        ids = [f"r{i}" for i in range(num_seqs)]
        for request_id in ids:
            teach(rule, request_id, rng.choice([0.0, 0.5, 0.75, 0.8, 0.9]), rng.choice([0.25, 0.5, 1.0]))
        estimates = {request_id: rule.acceptance(request_id) for request_id in ids}
        batch = StepShape(num_seqs, num_seqs * rng.randint(10, 4000))
        in_flight = rng.random() < 0.5
        plan = rule.plan([(request_id, k) for request_id in ids], batch, model, in_flight)
        best = max(expected_rate(costs, model, batch, in_flight, estimates,
                                 {r: c for r, c in zip(ids, counts) if c})
                   for counts in itertools.product(range(k + 1), repeat=num_seqs))
        got = expected_rate(costs, model, batch, in_flight, estimates, plan.num_tokens)
        assert got == pytest.approx(best, rel=1e-9), (trial, plan, estimates)
        num_plain += not plan.num_tokens
        num_spec += bool(plan.num_tokens)
        num_trimmed += any(count < k for count in plan.num_tokens.values())
    assert min(num_plain, num_spec, num_trimmed) > 10, (num_plain, num_spec, num_trimmed)


def test_the_crossover_is_found_by_calibrating_on_the_machine():
    """The cost model starts from its prior (an 8B model's costs) and learns a different machine from the steps the
    rule runs on it; at each batch size the rule settles where the machine's true costs say: speculate at 1, 4 and
    16 requests (acceptance 0.6), not at 64, where verifying costs more than it commits (probes aside)."""
    rng = random.Random(1)
    truth = StepCosts(*(2.0 * value for value in GPU_LIKE.as_vector()))
    model = StepCostModel(decode_graph_max_batch_size=64, verify_graph_max_batch_size=64)
    rule = SpeculationRule(3)
    previous_was_spec = True
    share_speculating: dict[int, float] = {}
    for num_seqs in (1, 4, 16, 64):
        ids = [f"{num_seqs}-{i}" for i in range(num_seqs)]
        decisions = []
        for _ in range(250):
            batch = StepShape(num_seqs, 600 * num_seqs)
            plan = rule.plan([(request_id, 3) for request_id in ids], batch, model, not previous_was_spec)
            num_drafts = 0
            for request_id, count in plan.num_tokens.items():
                if rng.random() < 0.1:  # no proposal this time
                    rule.record(request_id, 0, 0)
                    continue
                accepted = 0
                while accepted < count and rng.random() < 0.6:
                    accepted += 1
                rule.record(request_id, count, accepted)
                num_drafts += count
            shape = StepShape(num_seqs, batch.num_decode_context_tokens, 0, num_drafts,
                              is_serial=bool(plan.num_tokens) or previous_was_spec)
            model.observe(shape, truth.shape_s(shape, model.runs_graph(shape)) * rng.uniform(0.97, 1.03))
            previous_was_spec = num_drafts > 0
            decisions.append(num_drafts > 0)
        share_speculating[num_seqs] = sum(decisions[-100:]) / 100
    assert share_speculating[1] > 0.9 and share_speculating[4] > 0.9 and share_speculating[16] > 0.9, share_speculating
    assert share_speculating[64] < 0.1, share_speculating
    # What it learnt predicts the machine's verification steps.
    shape = StepShape(16, 9600, 0, 48, is_serial=True)
    assert model.predict(shape) == pytest.approx(truth.shape_s(shape, True), rel=0.05)


def test_a_collapsed_request_stops_and_is_probed_back():
    model = fixed_model(GPU_LIKE)
    rule = SpeculationRule(3)
    batch = StepShape(2, 1200)

    def plan() -> SpeculationPlan:
        result = rule.plan([("copying", 3), ("free", 3)], batch, model, step_in_flight=False)
        if "copying" in result.num_tokens:
            rule.record("copying", 3, 3)
        return result

    teach(rule, "copying", 0.9, 1.0)
    teach(rule, "free", 0.0, 0.5)
    assert plan().num_tokens == {"copying": 3}
    for num_plans in itertools.count(2):  # "free" is not asked until a probe step comes
        result = plan()
        if "free" in result.num_tokens:
            break
        assert result.num_tokens == {"copying": 3}
    assert num_plans == PROBE_INTERVAL_STEPS and result.num_probes == 1
    rule.record("free", 3, 3)  # it starts quoting
    for _ in range(4):
        assert plan().num_tokens.keys() == {"copying", "free"}
        rule.record("free", 3, 3)
    # Where only near-perfect acceptance would pay (a compute-bound machine), a collapsed request is not probed.
    dear = fixed_model(StepCosts(*GPU_LIKE.as_vector()[:8], per_draft_token_s=2e-3))
    rule = SpeculationRule(3)
    teach(rule, "free", 0.0, 0.5)
    assert all(not rule.plan([("free", 3)], batch, dear, False).num_tokens for _ in range(2 * PROBE_INTERVAL_STEPS))


def test_shadow_trials_are_scored_as_a_verification_would_score_them():
    rule = SpeculationRule(3)
    tokens = [5, 6, 7, 8, 9, 10]
    rule.add_shadow("a", 2, [7, 8, 1])  # would go at positions 2, 3, 4: the third differs from what came
    assert rule.shadow_start("a") == 2
    rule.settle_shadow("a", tokens[2:4])  # 7 and 8 matched, position 4 not known yet: undecided
    assert rule.has_shadow("a") and "a" not in rule._requests
    rule.settle_shadow("a", tokens[2:5])
    assert not rule.has_shadow("a")
    state = rule._requests["a"]
    # As record("a", 3, 2): two accepted, one rejection, an ask with proposals.
    assert rule.acceptance("a") == pytest.approx(((0.6 * 2 * 0.75 + 2) / (2 * 0.75 + 3),
                                                  (0.8 * 2 * 0.75 + 1) / (2 * 0.75 + 1)))
    assert state.last_ask_step == rule._num_steps
    rule.add_shadow("a", 5, [10])
    rule.settle_shadow("a", tokens[5:6])  # all matched
    rule.add_shadow("a", 6, [])  # none found: an ask without proposals, at once
    assert not rule.has_shadow("a")
    twin = SpeculationRule(3)
    for proposed, accepted in ((3, 2), (1, 1), (0, 0)):
        twin.record("a", proposed, accepted)
    assert rule.acceptance("a") == pytest.approx(twin.acceptance("a"))
    rule.add_shadow("b", 0, [1])
    rule.forget("b")
    assert not rule.has_shadow("b")


# The rule's costs as fitted on the H200 for the 42M trained model at batch 1 with n-gram (docs/results/
# spec_h200_d9dfec0.md): a graph step 0.64 ms, a serial one +0.364 ms, a verification +0.03 ms.
H200_B1_NGRAM = StepCosts(graph_step_s=6.4e-4, eager_step_s=9.4e-3, per_seq_s=4.3e-6, per_context_token_s=1.15e-11,
                          per_prompt_token_s=3.1e-6, serial_step_s=3.64e-4, spec_step_s=3.0e-5, spec_per_seq_s=1.8e-6,
                          per_draft_token_s=2e-7)


def simulate_editing(shadows: bool, num_steps: int = 600) -> tuple[float, float]:
    """One request at batch 1 writing out an edited copy: quoted spans of 40 tokens, which the n-gram lookup
    proposes exactly, between spans of 8 it writes anew, where the lookup finds nothing (5 of 6 lookups find a
    match, as in the H200's editing workload: 84% of asks every step had proposals). The engine's loop on the rule:
    settle, plan, then an ask (scored by the text) or, held back, a shadow lookup (if `shadows`). Returns (share
    of steps that speculated, tokens a step)."""
    model = fixed_model(H200_B1_NGRAM)
    rule = SpeculationRule(3)
    text = [t % 48 < 40 for t in range(4 * num_steps)]  # position -> inside a quoted span

    def lookup(position: int, limit: int) -> tuple[list[int], int]:
        """(proposal, how many of it are right) of an n-gram lookup with `position` tokens known."""
        if not text[position - 1]:
            return [], 0
        right = 0
        while right < limit and text[position + right]:
            right += 1
        return [0] * limit, right

    position, spec_steps, in_flight = 100, 0, False
    for _ in range(num_steps):
        if rule.has_shadow("r"):
            shadow = rule._shadows["r"]
            right = lookup(shadow.start, len(shadow.tokens))[1]
            truth = [0] * right + [1] * (len(shadow.tokens) - right)
            rule.settle_shadow("r", truth)
        plan = rule.plan([("r", 3)], StepShape(1, position), model, step_in_flight=in_flight)
        proposal: list[int] = []
        if plan.num_tokens:
            proposal, right = lookup(position, plan.num_tokens["r"])
            rule.record("r", len(proposal), right)
            position += right
        elif shadows and plan.could_pay and not rule.has_shadow("r"):
            rule.add_shadow("r", position, lookup(position, 3)[0])
        position += 1
        spec_steps += bool(proposal)
        in_flight = not proposal  # a plain step (asked without a match or not asked) goes in flight
    return spec_steps / num_steps, (position - 100) / num_steps


def test_shadow_trials_keep_a_quoting_request_speculating_across_edits():
    """With asks alone, a span written anew (a few misses in a row) holds a quoting request back until the next
    probe (docs/speculative.md: what that cost on a GPU). With shadow lookups while held back, quoting resumes
    within a few steps."""
    with_asks_only = simulate_editing(shadows=False)  # (0.08, 1.22) when written: the H200's collapse
    with_shadows = simulate_editing(shadows=True)  # (0.50, 2.40)
    assert with_shadows[0] > 0.4 and with_shadows[1] > 2.0, with_shadows
    assert with_shadows[1] > 1.5 * with_asks_only[1], (with_shadows, with_asks_only)


def test_no_shadow_trials_where_no_acceptance_pays():
    """A compute-bound step (64 sequences, 2 ms a proposal): not even proposals all accepted beat plain decoding,
    so the plan says so before weighing any request, and the engine spends no lookups on shadows."""
    dear = fixed_model(StepCosts(*GPU_LIKE.as_vector()[:8], per_draft_token_s=2e-3))
    rule = SpeculationRule(3)
    ids = [(f"r{i}", 3) for i in range(64)]
    assert not rule.plan(ids, StepShape(64, 64 * 600), dear, True).could_pay
    assert rule.plan(ids[:1], StepShape(1, 600), fixed_model(GPU_LIKE), True).could_pay


def test_the_cost_model_learns_what_speculation_adds():
    """Steps of every kind from a machine unlike the prior: what a verification step adds to the plain step of
    its batch (the rule's question) is predicted within 5%, and the costs of being serial within 10%."""
    rng = random.Random(2)
    truth = StepCosts(*(value * factor for value, factor in zip(GPU_LIKE.as_vector(), (2, 2, 2, 2, 2, 3, 1, 2, 1))))
    model = StepCostModel(decode_graph_max_batch_size=32, verify_graph_max_batch_size=8)
    for _ in range(800):
        num_seqs = rng.randint(1, rng.choice([8, 48]))
        spec = num_seqs <= 8 and rng.random() < 0.5
        shape = StepShape(num_seqs, num_seqs * rng.randint(50, 2000), rng.choice([0, 0, 0, rng.randint(16, 512)]),
                          num_seqs * rng.randint(0, 3) + 1 if spec else 0, is_serial=spec or rng.random() < 0.2)
        model.observe(shape, truth.shape_s(shape, model.runs_graph(shape)) * rng.uniform(0.98, 1.02))
    for num_seqs in (1, 4, 8):
        plain, spec = StepShape(num_seqs, 600 * num_seqs), StepShape(num_seqs, 600 * num_seqs, 0, 3 * num_seqs, True)
        want = truth.shape_s(spec, True) - truth.shape_s(plain, True)
        assert model.predict(spec) - model.predict(plain) == pytest.approx(want, rel=0.05), num_seqs
    assert model.costs().serial_step_s == pytest.approx(truth.serial_step_s, rel=0.1)


REPEATING = [
    [5, 9, 33, 7, 81, 12, 40, 41, 42, 5, 9, 33, 7, 81, 12, 40, 41, 42, 5, 9],
    [60, 61, 62, 63, 60, 61, 62, 63, 60, 61],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 100, 101, 102],
]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama")


def make_llm(model_dir, **config) -> LLM:
    return LLM(str(model_dir), dtype="float32", block_size=8, num_blocks=96, **config)


def run(llm: LLM, prompts, params) -> list[list[int]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return [out.outputs[0].token_ids for out in outputs]


def test_speculation_switched_on_and_off_mid_request_keeps_the_output(tiny_llama):
    """The real rule with fixed costs (the model's own fit would follow this loaded CPU's noise): verification dear
    keeps every step plain, which gives the reference outputs. Then a scripted rule: plain steps, steps where some
    requests speculate with 1..k proposals, steps where all do, in a cycle; then the real rule with verification
    nearly free. Greedy and seeded sampled outputs are plain decoding's token for token."""
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=4, seed=5, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    prompts = [REPEATING[0], REPEATING[1], REPEATING[2], REPEATING[0][4:]]
    llm = make_llm(tiny_llama, speculative_method="ngram", num_speculative_tokens=3)
    engine = llm.engine
    model = engine.scheduler.step_costs

    def fix_costs(per_draft_token_s: float) -> None:
        costs = StepCosts(1e-3, 1e-3, 1e-5, 0.0, 1e-5, serial_step_s=1e-4, spec_step_s=1e-4,
                          per_draft_token_s=per_draft_token_s)
        model.latest_costs = lambda: costs

    fix_costs(1.0)
    reference = run(llm, prompts, params)
    counts = engine.get_stats().spec_decode
    assert counts.num_spec_steps == 0 and counts.num_plain_steps_by_rule > 0 and counts.num_probes == 0

    rule = engine._speculator.rule
    real_plan = rule.plan
    cycle = itertools.count()

    def scripted(candidates, batch, model, step_in_flight):
        phase = next(cycle) % 4
        chosen = {request_id: 1 + (index + phase) % 3 for index, (request_id, _) in enumerate(candidates)
                  if phase == 3 or (phase in (1, 2) and index % 2 == phase - 1)}
        return SpeculationPlan(num_tokens=chosen)

    rule.plan = scripted
    assert run(llm, prompts, params) == reference
    scripted_counts = engine.get_stats().spec_decode
    assert scripted_counts.num_accepted_tokens > 0 and scripted_counts.num_spec_steps > 0
    assert scripted_counts.num_requests_held_back > counts.num_requests_held_back
    assert scripted_counts.num_plain_steps_by_rule > counts.num_plain_steps_by_rule

    # Every request held back where proposals could pay: the engine looks up shadows on the known tokens and
    # scores them as tokens arrive (every settled one is recorded), with no step speculating.
    recorded: list[tuple[str, int, int]] = []
    real_record = rule.record
    rule.record = lambda request_id, proposed, accepted: (recorded.append((request_id, proposed, accepted)),
                                                          real_record(request_id, proposed, accepted))
    rule.plan = lambda candidates, batch, model, step_in_flight: SpeculationPlan(could_pay=True)
    before = engine.get_stats().spec_decode
    assert run(llm, prompts, params) == reference
    after = engine.get_stats().spec_decode
    assert after.num_spec_steps == before.num_spec_steps
    assert after.num_shadow_trials - before.num_shadow_trials >= len(prompts) and before.num_shadow_trials == 0
    assert len({request_id for request_id, _, _ in recorded}) == len(prompts)
    assert any(proposed for _, proposed, _ in recorded) and any(accepted for _, _, accepted in recorded), recorded
    assert not rule._shadows  # finished requests leave none behind
    rule.record = real_record

    rule.plan = real_plan
    fix_costs(1e-9)
    observed = model.num_observed
    assert run(llm, prompts, params) == reference
    assert engine.get_stats().spec_decode.num_spec_steps > scripted_counts.num_spec_steps
    assert model.num_observed > observed  # speculative steps are timed and observed too
