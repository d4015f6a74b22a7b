"""Speculative decoding as the engine's step loop runs it: which decoding requests may speculate, the adaptive
rule's plan (engine/spec/adaptive.py), the proposer's proposals (engine/spec/ngram.py, engine/spec/draft.py), the
n-gram shadow trials, what verification accepted, and the counters the engine reports.

The engine owns one when `speculative_method` is set and asks it twice a step: `plan` before it touches the step
in flight (a step kept plain keeps its overlap with it), then, having delivered that step so that proposals
continue real tokens, `propose`. Verification itself is the engine's (its sampled rows against the proposals,
engine/spec/verify.py); it reports each outcome to `record_verified`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.config.resolve import ResolvedConfig
from pagedserve.engine.core.request import Request
from pagedserve.engine.core.stats import SpecDecodeCounts
from pagedserve.engine.core.step_cost import StepCostModel, StepShape
from pagedserve.engine.runner.model_runner import ModelRunner
from pagedserve.engine.spec.adaptive import MAX_SHADOWS_PER_STEP, SpeculationRule
from pagedserve.engine.spec.draft import DraftProposer
from pagedserve.engine.spec.ngram import NgramProposer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asks:
    """The requests a step asks for proposals, and at most how many each (None: k, the method's own)."""

    requests: list[Request]
    wanted: dict[str, int] | None


class Speculator:
    def __init__(self, proposer: NgramProposer | DraftProposer, num_speculative_tokens: int,
                 disable_batch_size: int, adaptive: bool, pipelining: bool = True) -> None:
        self.proposer = proposer
        self.pipelining = pipelining
        self.disable_batch_size = disable_batch_size
        # Within that bound, which requests speculate and with how many proposals (None: all of them, k each).
        self.rule = SpeculationRule(num_speculative_tokens) if adaptive else None
        self.stats = SpecDecodeCounts.counting(num_speculative_tokens)
        self._said_off_for_history = False
        self._num_plans = 0  # where the shadow lookups start among the held-back requests moves with it

    @classmethod
    def build(cls, settings: ResolvedConfig, target: ModelRunner, max_model_len: int) -> "Speculator | None":
        """The configured method's proposer (a draft model and its cache are loaded now, before the target plans
        its memory, which then counts them as taken), or None when speculation is off."""
        speculative = settings.speculative
        if not speculative.enabled:
            return None
        if speculative.method == "draft":
            proposer: NgramProposer | DraftProposer = DraftProposer.build(settings, target, max_model_len)
        else:
            proposer = NgramProposer(speculative.num_tokens, speculative.prompt_lookup_min,
                                     speculative.prompt_lookup_max)
        return cls(proposer, speculative.num_tokens, speculative.disable_batch_size, speculative.adaptive,
                   speculative.pipelining)

    def capture_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        if isinstance(self.proposer, DraftProposer):
            self.proposer.capture_cuda_graphs(max_batch_size, max_model_len)

    # ---- a step ------------------------------------------------------------------------------------
    def plan(self, running: Sequence[Request], step_costs: StepCostModel, max_batch_tokens: int,
             step_in_flight: bool) -> Asks | None:
        """Whom this step asks for proposals, or None when it does not speculate: more running requests than
        `disable_batch_size`, none that may, or the adaptive rule finds that none pays."""
        if not running:
            return None
        if len(running) > self.disable_batch_size:
            self.stats.num_steps_over_batch_size += 1
            return None
        candidates = [request for request in running if self._may_speculate(request)]
        if not candidates:
            return None
        rule = self.rule
        if rule is None:
            return Asks(candidates, None)
        shadowing = isinstance(self.proposer, NgramProposer)
        if shadowing:
            self._settle_shadows(candidates)
        self._num_plans += 1
        plan = rule.plan([(r.request_id, r.token_limit - r.num_tokens - 1) for r in candidates],
                         _batch_shape(running, max_batch_tokens), step_costs, step_in_flight=step_in_flight)
        wanted = plan.num_tokens
        self.stats.num_requests_held_back += len(candidates) - len(wanted)
        self.stats.num_probes += plan.num_probes
        if shadowing and plan.could_pay:
            self._add_shadows([request for request in candidates if request.request_id not in wanted])
        if not wanted:
            self.stats.num_plain_steps_by_rule += 1
            return None
        return Asks([request for request in candidates if request.request_id in wanted], wanted)

    def propose(self, asks: Asks) -> dict[str, list[int]] | None:
        """The proposals of the asked requests (every token of theirs known now), by request id; None if none
        had any. An ask without proposals tells the rule so."""
        requests = [request for request in asks.requests if not request.is_finished]  # a delivered token ended it
        limits = [r.token_limit - r.num_tokens - 1 for r in requests]
        if asks.wanted is not None:
            limits = [min(limit, asks.wanted[r.request_id]) for r, limit in zip(requests, limits)]
        proposals = self.proposer.propose_batch(requests, limits)
        if self.rule is not None:
            for request_id, tokens in proposals.items():
                if not tokens:  # asked, it had none (no n-gram match): as a rejection of its first proposal
                    self.rule.record(request_id, 0, 0)
        return {request_id: tokens for request_id, tokens in proposals.items() if tokens} or None

    @property
    def can_pipeline(self) -> bool:
        """Whether a verification can be followed by the next before its tokens arrive (`speculative_pipelining`,
        n-gram: its proposals are a lookup in tokens the host has; a draft model's would need the tokens on its
        device)."""
        return self.pipelining and isinstance(self.proposer, NgramProposer)

    def propose_pipelined(self, requests: Sequence[Request], drafts: dict[str, list[int]]) -> dict[str, list[int]] | None:
        """For a verification in flight (`drafts`: each request's proposals in it), the next step's tokens of each
        request on the guess that it accepts them all: the token the lookup expects it to sample after them, then up
        to as many proposals as it verifies now (at least one), by request id; None unless every request has them."""
        if not self.can_pipeline:
            return None
        result = {}
        for request in requests:
            known = request.token_ids_between(0, request.num_known_tokens)
            pending = drafts[request.request_id]
            # The proposals after the guessed token stay within the length limit, as `propose`'s do.
            limit = request.token_limit - (len(known) + len(pending) + 1) - 1
            # As many proposals as the verification in flight has (the rule's choice for the request), at most.
            tokens = self.proposer.propose_after(request.request_id, known, pending, min(limit, len(pending)) + 1)
            if len(tokens) < 2:
                return None
            result[request.request_id] = tokens
        return result

    def record_step(self, had_proposals: bool) -> None:
        """A step whose requests were asked went out, verifying proposals or (none came) plainly."""
        if had_proposals:
            self.stats.num_spec_steps += 1
        else:
            self.stats.num_steps_without_proposals += 1

    def record_verified(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        self.stats.record(num_proposed, num_accepted)
        if self.rule is not None:
            self.rule.record(request_id, num_proposed, num_accepted)

    def forget(self, request_id: str) -> None:
        self.proposer.forget(request_id)
        if self.rule is not None:
            self.rule.forget(request_id)

    def shutdown(self) -> None:
        if isinstance(self.proposer, DraftProposer):
            self.proposer.shutdown()

    # ---- inside ------------------------------------------------------------------------------------
    def _may_speculate(self, request: Request) -> bool:
        """Decoding, past min_tokens, and sampled without reading earlier tokens: penalties, bad words and
        grammar masks would need every proposal's own history (not built yet; such requests decode plainly)."""
        params = request.sampling_params
        if request.num_tokens - request.num_computed_tokens != 1 or request.num_tokens + 1 >= request.token_limit:
            return False
        if params.needs_token_history:
            if not self._said_off_for_history:
                self._said_off_for_history = True
                logger.info("speculative decoding is off for requests with penalties, bad words or structured "
                            "outputs (request %s and the like decode one token a step)", request.request_id)
            return False
        return request.num_output_tokens >= params.min_tokens

    def _settle_shadows(self, candidates: list[Request]) -> None:
        """Score the shadow trials (engine/spec/adaptive.py) whose tokens have arrived."""
        rule = self.rule
        for request in candidates:
            start = rule.shadow_start(request.request_id)
            if start is not None:  # the tokens since its lookup, not a copy of the whole sequence
                rule.settle_shadow(request.request_id, request.token_ids_between(start, request.num_known_tokens))

    def _add_shadows(self, held_back: list[Request]) -> None:
        """An n-gram lookup on the known tokens of up to MAX_SHADOWS_PER_STEP requests the rule held back this
        step (those without a pending one, from a place that moves every plan): what an ask would have given,
        scored as their tokens arrive, with no device work and the step in flight left in flight."""
        rule = self.rule
        budget = MAX_SHADOWS_PER_STEP
        offset = self._num_plans % len(held_back) if held_back else 0
        for request in held_back[offset:] + held_back[:offset]:
            if budget == 0:
                break
            if rule.has_shadow(request.request_id):
                continue
            budget -= 1
            self.stats.num_shadow_trials += 1
            num_known = request.num_known_tokens
            tokens = self.proposer.propose(request.request_id, request.token_ids_between(0, num_known),
                                           request.token_limit - num_known - 1)
            rule.add_shadow(request.request_id, num_known, tokens)


def _batch_shape(running: Sequence[Request], max_batch_tokens: int) -> StepShape:
    """The step as the cost model sees it: every running request; the decodes' context; the prompt tokens still
    to compute, as many as a step takes."""
    num_context_tokens = num_prompt_tokens = 0
    for request in running:
        num_tokens = request.num_tokens
        num_needed = num_tokens - request.num_computed_tokens
        if num_needed == 1:
            num_context_tokens += num_tokens
        elif num_needed > 1:
            num_prompt_tokens += num_needed
    return StepShape(len(running), num_context_tokens, min(num_prompt_tokens, max_batch_tokens))
