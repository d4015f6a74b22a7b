"""Snapshots of engine state for routing, health checks and metrics. Plain data: no engine references."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SpecDecodeCounts:
    """Speculative decoding since start (vLLM's spec_decode_* counters): verifications (`num_drafts`),
    proposed and accepted tokens, and accepted tokens by proposal position (index j: the (j+1)-th proposal).
    Then what decided the steps (engine/spec/adaptive.py): steps that verified proposals (`num_spec_steps`), steps
    with requests that could speculate that the adaptive rule kept plain, steps that asked for proposals and got
    none to verify (no n-gram match, no room), steps with more running requests than
    `speculative_disable_batch_size` (none speculates); requests the rule left out of a step (whether or not
    others speculated in it), requests it tried again after their acceptance had collapsed (probes), and the
    n-gram lookups it made for held-back requests (shadow trials: no device work). Pipelined verifications
    (n-gram): steps launched while the verification before them was still on the device, on the guess that it
    accepts every proposal and samples the token the lookup expects (`num_pipelined_steps`), and the requests whose
    rows in such a step were dropped because the guess was wrong (`num_pipelined_voids`).

    The speculator counts into one (`record`, its fields); `snapshot()` is the copy `EngineStats` carries."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: Sequence[int] = ()  # a list while counting, a tuple in a snapshot
    num_spec_steps: int = 0
    num_plain_steps_by_rule: int = 0
    num_steps_without_proposals: int = 0
    num_steps_over_batch_size: int = 0
    num_requests_held_back: int = 0
    num_probes: int = 0
    num_shadow_trials: int = 0
    num_pipelined_steps: int = 0
    num_pipelined_voids: int = 0

    @classmethod
    def counting(cls, num_speculative_tokens: int) -> "SpecDecodeCounts":
        """Zeroed counters for k = `num_speculative_tokens` positions."""
        return cls(num_accepted_tokens_per_pos=[0] * num_speculative_tokens)

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    def record(self, num_proposed: int, num_accepted: int) -> None:
        """A verification: `num_accepted` of its `num_proposed` proposals were accepted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            self.num_accepted_tokens_per_pos[position] += 1

    def snapshot(self) -> "SpecDecodeCounts":
        return dataclasses.replace(self, num_accepted_tokens_per_pos=tuple(self.num_accepted_tokens_per_pos))


@dataclass(frozen=True)
class EngineStats:
    """What a replica reports upward. Block counts are those of the most constrained layer group."""

    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    num_running: int
    num_waiting: int
    num_preempted_waiting: int
    max_model_len: int
    kv_cache_usage: float  # fraction of blocks in use, 0..1
    kv_cache_bytes_total: int
    kv_cache_bytes_used: int
    kv_cache_dtype: str = ""  # what the cache stores: the model's dtype name, or fp8_e4m3
    # Counters since start.
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    num_steps_total: int = 0  # steps that ran the model
    num_preemptions_total: int = 0
    num_prefix_cache_queries_total: int = 0  # prompt tokens looked up
    num_prefix_cache_hits_total: int = 0  # prompt tokens served from cache
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    # Recent steps.
    last_step_num_prefill_tokens: int = 0
    last_step_num_decode_tokens: int = 0
    max_batch_tokens: int = 0
    spec_decode: SpecDecodeCounts = field(default_factory=SpecDecodeCounts)
    # LoRA (engine/runner/lora.py; rank 0's view under tensor parallel): the device slots (`max_loras`; 0: LoRA off),
    # the adapters in them and in host memory now, least recently used first; adapter copies into a slot since start.
    num_lora_slots: int = 0
    lora_slot_names: tuple[str, ...] = ()
    lora_host_names: tuple[str, ...] = ()
    num_lora_slot_loads_total: int = 0

    @property
    def num_free_tokens(self) -> int:
        return self.num_free_blocks * self.block_size


@dataclass(frozen=True)
class StepStats:
    """One engine step, for histograms (step time, tokens per step) and the decode/prefill ratio."""

    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    step_time_s: float
    num_preempted: int = 0
    prefill_token_budget: int | None = None  # the most prompt tokens it could take beside decodes (None: no bound)
