"""The scheduler: which requests run this step, and how many of their tokens.

There is no prefill or decode phase. Each request's `num_computed_tokens` catches up with its
`num_tokens` (vLLM's rule): a new prompt needs many tokens, a decoding request one, a preempted request
everything again, and a prefix-cache hit starts the count further along. Each step has a token budget
(`max_batch_tokens`) and a sequence budget (`max_num_seqs`). FIFO policy: running requests first
(decodes and unfinished chunked prefills, oldest first), then waiting ones into what is left. When
blocks run out, the newest running request is preempted: its blocks are freed and it is recomputed
later, at the head of the queue. Pure logic: no tensors, no model.

Priority policy (vLLM's `priority`): each request has a priority, an int, lower served earlier. Waiting
requests are kept in (priority, arrival) order, so FIFO within a level, and a preempted one goes back to its
place in that order; running requests are scheduled in that order too, and the victim of a preemption is the
lowest-priority, newest one not yet scheduled this step. Before a step, while the best waiting request has a
strictly better priority than the worst running one and cannot start (no sequence slot, or fewer free blocks
than its first chunk needs), that running request is preempted: a high-priority arrival does not wait for
low-priority generations to end. Otherwise it schedules as `fifo` (decodes first, then admissions).

Latency bound (`max_prefill_tokens_while_decoding`): a step's time grows with its prompt tokens, and every
decoding request waits for the whole step, so long prompt chunks beside decodes stretch their time per
output token. While any running request is *decoding* (needs exactly one new token, the catch-up rule's
own test: no phases), the step's prefill chunks (waiting prompts, their chunked continuations, preempted
requests' recomputes) take at most that many tokens together; a step with no decodes keeps all of
`max_batch_tokens`, so a burst of prompts still fills steps. Under either policy the bound caps the
prefill, only the order differs. With chunked prefill off a prompt cannot be split: the step's first
prefill is taken whole even past the bound (never past `max_batch_tokens`); otherwise a prompt longer
than the bound would wait for a step without decodes, which steady traffic may never give. n > 1 children
forked from a prompt cost no tokens of their own and are decodes from the next step on.

Step-time budget (`prefill_step_time_ratio` r): a constant bound cannot suit every load. Low load wants small
prompt chunks (a step of 2,000 prompt tokens takes ten decode steps' time, and a light decode batch sees it
as a clump), high load wants large ones (small chunks cannot keep up with the prompts arriving, and time to
first token grows without bound). So the bound follows the step's time instead: with r on, a step with
decodes takes the prompt tokens whose own time is at most (r - 1) times the predicted decode-only step of the
same batch (so the step takes r times it, plus the fixed cost of running eager instead of from a CUDA graph,
which any prompt token brings), as `StepCostModel` predicts from the steps the engine ran
(engine/core/step_cost.py); at least MIN_PREFILL_TOKENS_PER_STEP so that prompts always progress, at most the
constant bound (or `max_batch_tokens`). That alone would starve prompts under load, so a deadline widens it:
the prompts in service order (running prefills, then the queue from its head) are each to be computed within
`ttft_target_s` of their arrival (of its last token, for a preempted request's recompute), and the step takes
at least the prompt tokens per step that this needs at the predicted step times (`prompt_tokens_to_drain`):
none while the queue is young, the constant bound once a deadline cannot be made. One pass over `running`
gathers the batch (without the rule, the test for any decode, as before) and at most NUM_WAITING_DEADLINES
waiting requests are weighed.

Speculative decoding: `schedule(drafts)` takes proposed tokens per decoding request; such a request's chunk
carries them (1 + k new tokens: its last token and the proposals), within the step's token budget and only
if its blocks have room for all of them: when they do not, the request decodes one token, so speculation
never preempts. `finish_step` counts only the last token as computed; `commit_drafts` then adds the
accepted proposals, so the K/V written for rejected ones lies past `num_computed_tokens` (overwritten
later) and the prefix cache only ever registers blocks full of committed tokens.

LoRA: a step runs at most `max_loras` distinct adapters (the device's slots); a running request of another
adapter sits the step out, and the head of the queue waits. A request's adapter salts its prefix-cache keys.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.cache.allocators import BlockCopy
from pagedserve.cache.blocks import blocks_for
from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.config.resolve import SchedulerSettings

from pagedserve.engine.core.request import FinishReason, Request, RequestStatus
from pagedserve.engine.core.step_cost import (
    StepCostModel,
    StepShape,
    prompt_tokens_to_drain,
    prompt_tokens_within_ratio,
)

# The step-time budget's floor: prompt tokens a step with decodes may always take, so that prompts progress
# however dear prompt tokens look to the cost model (on an H200 with an 8B model, 64 cost about 1.5 ms).
MIN_PREFILL_TOKENS_PER_STEP = 64
# Waiting requests whose deadlines the budget weighs, from the head of the queue: bounds the per-step work. A
# longer queue (45 req/s with a 0.5 s target holds about 22) is an overload the nearer deadlines already show.
NUM_WAITING_DEADLINES = 32


@dataclass
class ScheduledChunk:
    request: Request
    num_computed_tokens: int  # before this step
    num_new_tokens: int
    # True when this chunk reaches the end of the known tokens: its last logits give a new token.
    samples: bool
    # Proposed tokens scored after the request's last one (speculative decoding): logits at every one.
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass
class _StepBudget:
    """What one step may still take: `tokens` in all, and of them at most `prefill_tokens` in prefill chunks
    (None: no bound but `tokens`); and what it took, as the cost model sees a step."""

    tokens: int
    prefill_tokens: int | None
    num_prefill_chunks: int = 0
    num_seqs: int = 0
    num_decode_context_tokens: int = 0
    num_prompt_tokens: int = 0
    num_draft_tokens: int = 0

    def take(self, num_tokens: int, is_prefill: bool, num_context_tokens: int = 0, num_drafts: int = 0) -> None:
        """`num_context_tokens`: a decode's length (what it attends over)."""
        self.tokens -= num_tokens
        self.num_seqs += 1
        if is_prefill:
            self.num_prefill_chunks += 1
            self.num_prompt_tokens += num_tokens
            if self.prefill_tokens is not None:  # past zero only by a whole prompt (chunked prefill off)
                self.prefill_tokens = max(0, self.prefill_tokens - num_tokens)
        else:
            self.num_decode_context_tokens += num_context_tokens
            self.num_draft_tokens += num_drafts

    def shape(self) -> StepShape:
        return StepShape(self.num_seqs, self.num_decode_context_tokens, self.num_prompt_tokens, self.num_draft_tokens)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # n > 1: children forked from a parent this step; they sample from the parent's last logits.
    forks: dict[str, list[Request]] = field(default_factory=dict)
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[BlockCopy] = field(default_factory=list)
    lora_names: set[str] = field(default_factory=set)  # the LoRA adapters of this step's chunks
    shape: StepShape = field(default_factory=StepShape)  # what the step's time depends on (its cost model's input)
    prefill_token_budget: int | None = None  # the most prompt tokens it could take beside decodes (None: no bound)

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_new_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerSettings, kv_cache: KVCacheManager, step_costs: StepCostModel | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`step_costs`: the step-time model the budget rule asks (the engine feeds it through `observe_step`);
        `clock`: monotonic seconds, the clock of requests' arrival and token times."""
        self.config = config
        self.kv_cache = kv_cache
        self.step_costs = step_costs if step_costs is not None else StepCostModel()
        self._clock = clock
        self._drafts: dict[str, list[int]] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._awaiting_fork: dict[str, list[Request]] = {}
        self.num_preemptions_total = 0
        # The policy `waiting` was last ordered for: switching to `priority` at run time sorts it once.
        self._waiting_order_policy = config.policy

    @staticmethod
    def priority_key(request: Request) -> tuple[int, float]:
        """The priority policy's order: better (lower) priority first, then earlier arrival."""
        return request.priority, request.arrival_time

    @property
    def is_priority(self) -> bool:
        return self.config.policy == "priority"

    def _enqueue(self, request: Request, at_front: bool) -> None:
        """Into `waiting`: by priority under the priority policy; else at the back, or the front (preempted)."""
        if self.is_priority:
            bisect.insort_right(self.waiting, request, key=self.priority_key)
        elif at_front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    # ---- admission -----------------------------------------------------------------------------
    def add_request(self, request: Request, children: list[Request] | None = None) -> None:
        """Queue a request; `children` (n > 1) start once its prompt is computed, sharing its blocks."""
        request.status = RequestStatus.WAITING
        self._enqueue(request, at_front=False)
        if children:
            self._awaiting_fork[request.request_id] = children

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + sum(len(c) for c in self._awaiting_fork.values())

    @property
    def num_preempted_waiting(self) -> int:
        return sum(1 for request in self.waiting if request.status is RequestStatus.PREEMPTED)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self, drafts: dict[str, list[int]] | None = None) -> SchedulerOutput:
        """`drafts`: request id -> proposed tokens, for decoding requests that speculate this step."""
        output = SchedulerOutput()
        self._drafts = drafts or {}
        output.prefill_token_budget = self._prefill_token_budget()
        budget = _StepBudget(self.config.max_batch_tokens, output.prefill_token_budget)
        if self.config.policy == "prefill_first":
            self._schedule_waiting(output, budget)
            self._schedule_running(output, budget)
        elif self.is_priority:
            self._order_for_priority()
            self._preempt_for_waiting(output, budget)
            num_preempted_for_waiting = len(output.preempted)
            self._schedule_running(output, budget)
            if len(output.preempted) == num_preempted_for_waiting:  # as fifo: none under memory pressure
                self._schedule_waiting(output, budget)
        else:
            self._schedule_running(output, budget)
            if not output.preempted:  # under memory pressure, admit nothing new
                self._schedule_waiting(output, budget)
        if not self.is_priority:
            self._waiting_order_policy = self.config.policy
        output.block_copies = self.kv_cache.take_pending_copies()
        output.shape = budget.shape()
        return output

    def observe_step(self, shape: StepShape, seconds: float) -> None:
        """A step of `shape` took `seconds` on the device (the engine measures): the cost model learns it."""
        self.step_costs.observe(shape, seconds)

    def _prefill_token_budget(self) -> int | None:
        """The most prompt tokens this step takes beside decodes; None when nothing decodes (no bound but
        `max_batch_tokens`). The constant bound, or with the ratio rule on, the step-time budget within it."""
        config = self.config
        ratio = config.prefill_step_time_ratio
        if ratio is None:
            return config.max_prefill_tokens_while_decoding if any(
                self._is_decoding(request) for request in self.running) else None
        num_decoding = num_context_tokens = 0
        prefilling: list[Request] = []  # running requests with prompt tokens (or a recompute) to go, in order
        for request in self.running:
            num_tokens = request.num_tokens
            num_needed = num_tokens - request.num_computed_tokens
            if num_needed < 1 or num_tokens >= request.token_limit:
                continue
            if num_needed == 1:
                num_decoding += 1
                num_context_tokens += num_tokens
            else:
                prefilling.append(request)
        if num_decoding == 0:
            return None
        most = config.max_prefill_tokens_while_decoding or config.max_batch_tokens
        model = self.step_costs
        costs = model.costs()
        decode_runs_graph = 0 < num_decoding <= model.decode_graph_max_batch_size
        tokens = prompt_tokens_within_ratio(costs, num_decoding, num_context_tokens, decode_runs_graph, ratio)
        # The deadlines, in service order: running prefills, then the queue from its head (as far as one can bind).
        step_without_prompt_s = costs.step_s(num_decoding + 1, num_context_tokens, 0,
                                             runs_graph=num_decoding + 1 <= model.mixed_graph_max_tokens)
        deadline_from_now_s = config.ttft_target_s - self._clock()
        num_backlog_tokens = 0
        for request in itertools.chain(prefilling, itertools.islice(self.waiting, NUM_WAITING_DEADLINES)):
            if tokens >= most:
                break
            num_backlog_tokens += request.num_tokens - request.num_computed_tokens
            slack_s = deadline_from_now_s + self._waiting_since(request)
            tokens = max(tokens, prompt_tokens_to_drain(costs, step_without_prompt_s, num_backlog_tokens, slack_s))
        return int(min(most, max(MIN_PREFILL_TOKENS_PER_STEP, tokens)))

    @staticmethod
    def _waiting_since(request: Request) -> float:
        """When the request began waiting for its next token: its last one (a preempted request), else its arrival."""
        last = request.metrics.last_token_time
        return last if last is not None else request.arrival_time

    def _order_for_priority(self) -> None:
        """Running requests in priority order (stable: admission order within a level); waiting ones sorted
        once after a switch from another policy (from then on they are inserted in order)."""
        self.running.sort(key=self.priority_key)
        if self._waiting_order_policy != "priority":
            self.waiting = deque(sorted(self.waiting, key=self.priority_key))
            self._waiting_order_policy = "priority"

    def _preempt_for_waiting(self, output: SchedulerOutput, budget: _StepBudget) -> None:
        """Preempt the worst running requests while the best waiting one outranks them and cannot start."""
        while self.waiting and self.running:
            head, worst = self.waiting[0], self.running[-1]
            if worst.priority <= head.priority:
                return
            has_slot = len(self.running) < self.config.max_num_seqs
            # Its first chunk's blocks, prefix-cache hits not counted: at worst one preemption too many.
            num_first_chunk = min(head.num_tokens - head.num_computed_tokens, budget.tokens)
            if has_slot and blocks_for(num_first_chunk, self.kv_cache.block_size) <= self.kv_cache.num_free_blocks:
                return
            self._preempt(worst, output)

    @staticmethod
    def _is_decoding(request: Request) -> bool:
        """Needs exactly one new token (its last sampled one), and is not at its length limit."""
        return request.num_tokens < request.token_limit and request.num_tokens - request.num_computed_tokens == 1

    def _chunk_size(self, num_needed: int, budget: _StepBudget, is_prefill: bool) -> int:
        limit = budget.tokens
        if is_prefill and budget.prefill_tokens is not None:
            limit = min(limit, budget.prefill_tokens)
        if self.config.enable_chunked_prefill:
            return min(num_needed, limit)
        if num_needed <= limit:
            return num_needed
        # A whole prompt past the bound: the step's first prefill takes it, or it could wait for ever.
        if is_prefill and budget.num_prefill_chunks == 0 and num_needed <= budget.tokens:
            return num_needed
        return 0

    def _schedule_running(self, output: SchedulerOutput, budget: _StepBudget) -> None:
        scheduled_ids = {chunk.request.request_id for chunk in output.chunks}
        index = 0
        while index < len(self.running) and budget.tokens > 0:
            request = self.running[index]
            if request.request_id in scheduled_ids or not self._lora_fits(output, request):
                index += 1
                continue
            num_tokens = request.num_tokens
            num_needed = num_tokens - request.num_computed_tokens
            # At its length limit the request only waits for its last token (still on the device under
            # async scheduling) to be delivered: that token's K/V is never needed.
            num_new = 0 if num_tokens >= request.token_limit else self._chunk_size(
                num_needed, budget, is_prefill=num_needed > 1)
            if num_new == 0:
                index += 1
                continue
            drafts = self._fit_drafts(request, num_needed, budget)
            if drafts:
                self._add_chunk(output, request, request.num_computed_tokens, 1 + len(drafts), drafts)
                scheduled_ids.add(request.request_id)
                budget.take(1 + len(drafts), is_prefill=False, num_context_tokens=num_tokens, num_drafts=len(drafts))
                index += 1
                continue
            while not self.kv_cache.allocate_slots(request.request_id, request.num_computed_tokens, num_new):
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim, output)
                if victim is request:
                    break
            else:
                self._add_chunk(output, request, request.num_computed_tokens, num_new)
                scheduled_ids.add(request.request_id)
                budget.take(num_new, is_prefill=num_needed > 1, num_context_tokens=num_tokens)
                index += 1

    def _fit_drafts(self, request: Request, num_needed: int, budget: _StepBudget) -> list[int]:
        """The proposals a decoding request scores this step: as many as the budget and the request's length
        limit allow, [] if its blocks cannot take them all (it then decodes one token, the usual way). [] too for a
        prompt's last token whose n > 1 completions fork from it: they sample from its logits, which a verification
        does not give them."""
        drafts = self._drafts.get(request.request_id)
        if not drafts or num_needed != 1 or request.request_id in self._awaiting_fork:
            return []
        # Every committed token counts: the last proposal's bonus token must stay within the limit too.
        room = min(budget.tokens - 1, request.token_limit - request.num_tokens - 1)
        drafts = drafts[:max(0, room)]
        if drafts and not self.kv_cache.allocate_slots(request.request_id, request.num_computed_tokens,
                                                       1 + len(drafts)):
            return []
        return drafts

    def _pick_victim(self, scheduled_ids: set[str]) -> Request:
        """The newest running request not yet scheduled this step (the current one as a last resort); under the
        priority policy `running` is in priority order, so this is the lowest-priority, newest one."""
        for request in reversed(self.running):
            if request.request_id not in scheduled_ids:
                return request
        raise AssertionError("no running request left to preempt")  # the current request is never scheduled yet

    def _schedule_waiting(self, output: SchedulerOutput, budget: _StepBudget) -> None:
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self._lora_fits(output, request):
                break  # FIFO: it waits for a step with room for its adapter
            cached_tables: list[list[int | None]] = []
            num_cached = 0
            if not self.kv_cache.has_blocks(request.request_id):
                cached_tables, num_cached = self.kv_cache.find_cached_prefix(
                    request.request_id, request.all_token_ids, request.lora_name
                )
            num_new = self._chunk_size(request.num_tokens - num_cached, budget, is_prefill=True)
            if num_new == 0:
                break
            if not self.kv_cache.allocate_slots(request.request_id, num_cached, num_new, cached_tables):
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            if request.status is RequestStatus.WAITING:
                request.metrics.first_scheduled_time = self._clock()
                request.num_cached_prompt_tokens = num_cached
                request.metrics.num_cached_prompt_tokens = num_cached
                self.kv_cache.record_prefix_query(request.num_prompt_tokens, num_cached)
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_chunk(output, request, num_cached, num_new)
            budget.take(num_new, is_prefill=True)

    def _lora_fits(self, output: SchedulerOutput, request: Request) -> bool:
        """A step runs at most `max_loras` distinct adapters (the device's slots): one more fits if it is
        already among them or there is room."""
        name = request.lora_name
        if name is None or self.config.max_loras == 0:
            return True
        return name in output.lora_names or len(output.lora_names) < self.config.max_loras

    def _add_chunk(self, output: SchedulerOutput, request: Request, num_computed: int, num_new: int,
                   drafts: list[int] | None = None) -> None:
        drafts = drafts or []
        chunk = ScheduledChunk(request, num_computed, num_new,
                               samples=num_computed + num_new - len(drafts) == request.num_tokens,
                               draft_token_ids=drafts)
        output.chunks.append(chunk)
        if request.lora_name is not None:
            output.lora_names.add(request.lora_name)
        children = self._awaiting_fork.get(request.request_id)
        if children and chunk.samples and request.num_output_tokens == 0:
            del self._awaiting_fork[request.request_id]
            for child in children:
                self.kv_cache.fork(request.request_id, child.request_id)
                child.num_computed_tokens = request.num_prompt_tokens
                child.status = RequestStatus.RUNNING
                self.running.append(child)
            output.forks[request.request_id] = children

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        self.num_preemptions_total += 1
        self._enqueue(request, at_front=True)
        output.preempted.append(request)

    def finish_step(self, output: SchedulerOutput) -> None:
        """Advance computed-token counts after the model ran (before sampled tokens are appended). Proposals
        are not counted: `commit_drafts` adds the accepted ones once they are known."""
        for chunk in output.chunks:
            self._advance(chunk.request, chunk.num_computed_tokens + chunk.num_new_tokens - len(chunk.draft_token_ids))

    def commit_drafts(self, request: Request, num_accepted: int) -> None:
        """`num_accepted` proposals of the request's last speculative step are now its tokens (appended):
        their K/V, written by that step, counts as computed. Rejected ones' slots are simply written again."""
        if num_accepted > 0 and not request.is_finished:
            self._advance(request, request.num_computed_tokens + num_accepted)

    def _advance(self, request: Request, num_computed: int) -> None:
        block_size = self.kv_cache.block_size
        before = request.num_computed_tokens
        request.num_computed_tokens = num_computed
        if num_computed // block_size > before // block_size:
            self.kv_cache.cache_full_blocks(request.request_id, request.all_token_ids, num_computed, request.lora_name)

    # ---- endings -------------------------------------------------------------------------------
    def finish_request(self, request: Request, reason: FinishReason) -> None:
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        for child in self._awaiting_fork.pop(request.request_id, []):
            child.status = RequestStatus.FINISHED
            child.finish_reason = reason
