"""Adaptive speculation: each step, which decoding requests speculate, and with how many proposals.

Speculating costs a step more time (a verification step's own costs and its proposals' rows, and the host/device
overlap that async scheduling gives plain steps: engine/core/step_cost.py fits all of them from the engine's
measured steps) and commits more tokens, as many more as the proposals that are accepted. Where that pays depends
on the machine, the model, the batch and each request's acceptance: on a GPU a small batch verifies k extra rows
nearly for free (the weights are read once for all rows), a large one is compute bound; free text accepts little,
an edit that copies a passage nearly everything. So the rule is not a batch size: each step it picks the plan with
the most expected committed tokens per second, by the step costs fitted so far and each request's acceptance.

Acceptance: a request asked for proposals has some with probability q (n-gram: a match; draft: room in its
cache), and they are accepted one after another with probability p each (the verification stops at the first
rejection), so asking for k' proposals commits q x (p + ... + p^k') tokens beyond the plain one. p is estimated per
request as accepted / (accepted + rejections) over its recent verifications (the maximum-likelihood estimate for
such runs; accepted / proposed would understate it whenever a run stops early), q as the share of asks that gave
proposals; both decayed by REQUEST_DECAY an observation and starting from the engine-wide estimates as if seen
PRIOR_TRIALS times. The engine-wide ones move by GLOBAL_WEIGHT a step toward the step's pooled rates, so that one
step does not swing them however many requests it asked (a new request's first asks often find no n-gram match
yet: a fresh batch would otherwise tell the requests after it that nothing ever proposes).

The plan: with N requests in the step, the plain step commits N tokens in t_plain; speculating costs
t_spec = t_plain + F + c x (proposals), F the fixed part (a verification step's own costs, and if a plain step is
in flight, the overlap lost by this step and by the one after it, which starts with nothing in flight), c a
proposal's cost. Asking request i for its j-th proposal adds q_i p_i^j expected tokens for q_i c expected seconds;
the best plan takes every proposal whose gain per cost, p_i^j / c, exceeds R, the plan's own tokens per second
(Dinkelbach), so one pass at R = the plain step's rate decides whether to speculate at all (adding a proposal
worth more than R to a plan that beats R keeps it above R) and a second pass at the plan's rate trims each k'
(k' = the number of j with p_i^j > c x R, a logarithm a request), repeated at the new rate while it rises (at most
MAX_TRIMS times; it stops at the best plan, usually after one): O(batch) a step.

Shadow trials (n-gram): a request held back still shows what an ask would have given, for the price of a lookup
in its own tokens and no device work: the engine looks up the tokens it knows (`add_shadow`; the one in flight not
yet among them), and as the real tokens arrive `settle_shadow` scores the lookup as a verification would have
(none found: an ask without proposals; else the proposals accepted until the first that differs from the token
that came). So q and p follow the text as it turns from free to quoting and back, not only while the request is
asked: with asks alone a few misses in a row (a span written anew) held a quoting request back until the next probe
(docs/speculative.md, "Shadow trials", has what that cost on a GPU).
One shadow a request at a time, at most MAX_SHADOWS_PER_STEP a step, and none in a step where even proposals that
always come and are always accepted would not pay (`SpeculationPlan.could_pay`: large compute-bound batches).
A sampled request's tokens match a fixed proposal with the target's probability of it, which is what rejection
sampling accepts it with: the score is unbiased for sampling too.

Probing: a request whose acceptance collapsed (free text) gets no proposals, so nothing would ever show that it
recovered (it starts quoting); shadow trials show it where the method has them (they count as asks here), probes
everywhere else. Every PROBE_INTERVAL_STEPS steps the rule plans the requests not asked in that long as if they had
proposals and accepted them with probability at least PROBE_ACCEPTANCE, so they are tried again where an average
acceptance would pay: never where only near-perfect acceptance pays (large compute-bound batches), so probing costs
little there. Requests new to the rule count as not asked.

Pure Python, no torch; owned by the engine, which calls `plan` before it asks for proposals (a step the rule keeps
plain keeps its overlap with the step in flight), `record` with what each ask gave, `add_shadow` /
`settle_shadow` for the shadow trials and `forget` when a request ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedserve.engine.core.step_cost import StepCostModel, StepShape

PRIOR_ACCEPTANCE = 0.6  # the engine-wide p before any verification
PRIOR_PROPOSING = 0.8  # the engine-wide q before any ask
PRIOR_TRIALS = 2.0  # how many trials a request's own estimate starts as (at the engine-wide one)
REQUEST_DECAY = 0.75  # per verification of the request: about its last four count
GLOBAL_WEIGHT = 0.1  # per step with asks
PROBE_INTERVAL_STEPS = 32
PROBE_ACCEPTANCE = 0.5
MAX_TRIMS = 4
MAX_SHADOWS_PER_STEP = 8
_NEVER = -(1 << 62)


@dataclass
class _Acceptance:
    accepted: float  # decayed sums: accepted proposals,
    trials: float  # accepted proposals and rejections,
    proposing: float  # asks that gave proposals,
    asks: float  # and asks
    last_ask_step: int = _NEVER

    @property
    def rate(self) -> float:
        """p: a proposal's acceptance, given the ones before it were accepted."""
        return self.accepted / self.trials if self.trials > 0.0 else 0.0

    @property
    def proposing_rate(self) -> float:
        """q: the share of asks that gave proposals."""
        return self.proposing / self.asks if self.asks > 0.0 else 0.0

    def add(self, decay: float, num_proposed: int, num_accepted: int) -> None:
        self.proposing = self.proposing * decay + (1.0 if num_proposed else 0.0)
        self.asks = self.asks * decay + 1.0
        if num_proposed:
            self.accepted = self.accepted * decay + num_accepted
            self.trials = self.trials * decay + num_accepted + (1.0 if num_accepted < num_proposed else 0.0)


@dataclass
class _Shadow:
    start: int  # where in the request's tokens the first proposal would go
    tokens: list[int]


@dataclass
class SpeculationPlan:
    """What `plan` decided: proposals to ask for by request id (none: a plain step); how many of those requests
    were probes; the expected tokens per second of the plain step and of the plan (0 when plain); `could_pay`:
    whether proposals would pay in this step if every candidate had k of them, all accepted (else no plan of any
    acceptance beats the plain step, and watching the held-back requests is wasted: no shadow trials)."""

    num_tokens: dict[str, int] = field(default_factory=dict)
    num_probes: int = 0
    plain_tokens_per_s: float = 0.0
    spec_tokens_per_s: float = 0.0
    could_pay: bool = False


class SpeculationRule:
    """Per-request acceptance and the per-step plan (module docstring)."""

    def __init__(self, num_speculative_tokens: int, probe_interval_steps: int = PROBE_INTERVAL_STEPS,
                 probe_acceptance: float = PROBE_ACCEPTANCE) -> None:
        self.num_speculative_tokens = num_speculative_tokens
        self.probe_interval_steps = probe_interval_steps
        self.probe_acceptance = probe_acceptance
        self._requests: dict[str, _Acceptance] = {}
        self._global = _Acceptance(PRIOR_ACCEPTANCE, 1.0, PRIOR_PROPOSING, 1.0)  # rates as sums over 1
        self._step_sums = _Acceptance(0.0, 0.0, 0.0, 0.0)  # the asks since the last plan, pooled
        self._num_steps = 0  # plans made
        self._shadows: dict[str, _Shadow] = {}  # request id -> its pending shadow trial

    def acceptance(self, request_id: str) -> tuple[float, float]:
        """(p, q) of the request, or the engine-wide ones for a request not asked yet."""
        state = self._requests.get(request_id) or self._global
        return state.rate, state.proposing_rate

    @property
    def global_acceptance(self) -> tuple[float, float]:
        return self._global.rate, self._global.proposing_rate

    def _fold_step(self) -> None:
        """Move the engine-wide rates toward the pooled rates of the last step's asks."""
        sums, glob = self._step_sums, self._global
        if sums.asks:
            glob.proposing += GLOBAL_WEIGHT * (sums.proposing_rate - glob.proposing)
        if sums.trials:
            glob.accepted += GLOBAL_WEIGHT * (sums.rate - glob.accepted)
        self._step_sums = _Acceptance(0.0, 0.0, 0.0, 0.0)

    def record(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        """An ask of the request: `num_accepted` of its `num_proposed` proposals were accepted (0 of 0: it had
        none)."""
        state = self._requests.get(request_id)
        if state is None:
            glob = self._global
            state = self._requests[request_id] = _Acceptance(glob.rate * PRIOR_TRIALS, PRIOR_TRIALS,
                                                             glob.proposing_rate * PRIOR_TRIALS, PRIOR_TRIALS)
        state.add(REQUEST_DECAY, num_proposed, num_accepted)
        state.last_ask_step = self._num_steps
        self._step_sums.add(1.0, num_proposed, num_accepted)

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._shadows.pop(request_id, None)

    def has_shadow(self, request_id: str) -> bool:
        return request_id in self._shadows

    def shadow_start(self, request_id: str) -> int | None:
        """Where in the request's tokens its pending shadow trial's first proposal would go (None: no trial)."""
        shadow = self._shadows.get(request_id)
        return None if shadow is None else shadow.start

    def add_shadow(self, request_id: str, start: int, tokens: list[int]) -> None:
        """A lookup for a request this step held back (module docstring): `tokens` would have been proposed to go
        at position `start` of its tokens (its known ones end there). None found: recorded now, as an ask
        without proposals; else scored by `settle_shadow` as the tokens arrive."""
        if tokens:
            self._shadows[request_id] = _Shadow(start, list(tokens))
        else:
            self.record(request_id, 0, 0)

    def settle_shadow(self, request_id: str, arrived: Sequence[int]) -> None:
        """Score the request's pending shadow trial against `arrived`, its real tokens from `shadow_start` on (as
        many as are known), once they decide it: a proposal that differs from the token that came, or all of them
        matched."""
        shadow = self._shadows.get(request_id)
        if shadow is None:
            return
        matched = 0
        for index, token in enumerate(shadow.tokens):
            if index >= len(arrived):
                return  # not decided yet
            if arrived[index] != token:
                break
            matched += 1
        del self._shadows[request_id]
        self.record(request_id, len(shadow.tokens), matched)

    def plan(self, candidates: Sequence[tuple[str, int]], batch: StepShape, model: StepCostModel,
             step_in_flight: bool) -> SpeculationPlan:
        """Which of `candidates` ((request id, the most proposals its length limit allows)) speculate this step
        and with how many proposals, for a step of `batch` (its sequences, decode context and prompt tokens, no
        proposals) by `model`'s latest costs; `step_in_flight`: a plain step would overlap the one in flight."""
        self._fold_step()
        self._num_steps += 1
        is_probe_step = self._num_steps % self.probe_interval_steps == 0
        costs = model.latest_costs()
        plain = StepShape(batch.num_seqs, batch.num_decode_context_tokens, batch.num_prompt_tokens,
                          is_serial=not step_in_flight)
        plain_s = costs.shape_s(plain, model.runs_graph(plain))
        verify = StepShape(batch.num_seqs, batch.num_decode_context_tokens, batch.num_prompt_tokens,
                           num_draft_tokens=1, is_serial=True)
        # The step with proposals but their own cost: the verification step's fixed and per-sequence costs, and the
        # lost overlap: this step's, and with a plain step in flight also the next plain step's, which will start
        # with nothing in flight (without one, a plain step now would be that restart: no difference).
        spec_fixed_s = costs.shape_s(verify, model.runs_graph(verify)) - costs.per_draft_token_s
        if step_in_flight:
            spec_fixed_s += costs.serial_step_s
        base_tokens = max(batch.num_seqs, 1)
        plain_rate = base_tokens / plain_s if plain_s > 0.0 else 0.0
        result = SpeculationPlan(plain_tokens_per_s=plain_rate)
        k = self.num_speculative_tokens
        per_draft_s = costs.per_draft_token_s
        # With every proposal found and accepted, D of them commit N + D tokens in F + c D seconds: monotonic in D,
        # so the best D among 1..k x candidates (at least as many as the limits allow) is an end; O(1), before
        # any per-request work (a compute-bound step, where none pays, then costs the rule almost nothing).
        result.could_pay = bool(candidates) and any(
            spec_fixed_s + per_draft_s * drafts <= 0.0
            or (base_tokens + drafts) / (spec_fixed_s + per_draft_s * drafts) > plain_rate
            for drafts in (1, k * len(candidates)))
        if not result.could_pay:  # no acceptance pays: no need to weigh each request's
            return result
        # Each candidate's (id, p, q, most proposals, probed).
        rows: list[tuple[str, float, float, int, bool]] = []
        for request_id, limit in candidates:
            most = min(k, limit)
            if most <= 0:
                continue
            state = self._requests.get(request_id)
            known = state or self._global
            rate, proposing = known.rate, known.proposing_rate
            probed = False
            if is_probe_step and (rate < self.probe_acceptance or proposing < 1.0) and (
                    state is None or self._num_steps - state.last_ask_step >= self.probe_interval_steps):
                rate, proposing, probed = max(rate, self.probe_acceptance), 1.0, True
            if rate > 0.0 and proposing > 0.0:
                rows.append((request_id, rate, proposing, most, probed))
        if not rows:
            return result
        chosen, tokens, num_drafts = _take_proposals(rows, per_draft_s * plain_rate)
        spec_s = spec_fixed_s + per_draft_s * num_drafts
        spec_rate = (base_tokens + tokens) / spec_s if spec_s > 0.0 else float("inf")
        if not chosen or spec_rate <= plain_rate:
            return result
        for _ in range(MAX_TRIMS if per_draft_s > 0.0 else 0):  # trim each k' at the plan's own rate
            trimmed, trimmed_tokens, trimmed_drafts = _take_proposals(rows, per_draft_s * spec_rate)
            trimmed_rate = (base_tokens + trimmed_tokens) / (spec_fixed_s + per_draft_s * trimmed_drafts)
            if not trimmed or trimmed_rate <= spec_rate:
                break
            chosen, spec_rate = trimmed, trimmed_rate
        result.num_tokens = chosen
        result.spec_tokens_per_s = spec_rate
        result.num_probes = sum(1 for request_id, _, _, _, probed in rows if probed and request_id in chosen)
        return result


def _take_proposals(rows: list[tuple[str, float, float, int, bool]],
                    threshold: float) -> tuple[dict[str, int], float, float]:
    """Each request's proposals whose gain per cost p^j exceeds `threshold` (the first k' of them): by request
    id, with their expected accepted tokens and their expected number (q x k' each)."""
    chosen: dict[str, int] = {}
    tokens = 0.0
    num_drafts = 0.0
    log_threshold = math.log(threshold) if threshold > 0.0 else None
    for request_id, rate, proposing, most, _ in rows:
        if rate <= threshold:  # not even its first proposal is worth its cost
            continue
        if rate >= 1.0 or log_threshold is None:
            count = most
        else:
            # p^j > threshold  <=>  j < log(threshold) / log(p)
            count = min(most, math.ceil(log_threshold / math.log(rate)) - 1)
        if count <= 0:
            continue
        chosen[request_id] = count
        num_drafts += proposing * count
        tokens += proposing * (count if rate >= 1.0 else rate * (1.0 - rate ** count) / (1.0 - rate))
    return chosen, tokens, num_drafts
