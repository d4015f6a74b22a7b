"""The scheduler with proposed tokens: slot reservation, budgets, rollback of rejected proposals; no model."""

from __future__ import annotations

from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.config.resolve import SchedulerSettings
from pagedserve.engine.core.request import Request, SamplingParams
from pagedserve.engine.core.scheduler import Scheduler


def make(num_blocks=32, block_size=4, max_batch_tokens=64, max_num_seqs=8):
    kv = KVCacheManager(block_size, [None], [num_blocks], enable_prefix_caching=True)
    config = SchedulerSettings(max_num_seqs, max_batch_tokens, 256, enable_chunked_prefill=True, policy="fifo",
                               max_prefill_tokens_while_decoding=None)
    return Scheduler(config, kv), kv


def decoding(scheduler: Scheduler, name: str, num_prompt: int, max_tokens: int = 32) -> Request:
    """A request whose prompt is computed and whose first output token is known (it now decodes)."""
    return decoding_all(scheduler, [(name, num_prompt, max_tokens)])[0]


def decoding_all(scheduler: Scheduler, specs: list[tuple[str, int, int]]) -> list[Request]:
    requests = []
    for index, (name, num_prompt, max_tokens) in enumerate(specs):
        first = 10 + 100 * index  # prompts of different requests share no cached block
        request = Request(name, list(range(first, first + num_prompt)), SamplingParams(max_tokens=max_tokens))
        request.token_limit = num_prompt + max_tokens
        scheduler.add_request(request)
        requests.append(request)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in requests):
        scheduler.finish_step(scheduler.schedule())
    for request in requests:
        request.output_token_ids.append(7)
    return requests


def verify(scheduler: Scheduler, out, committed: dict[str, list[int]]) -> None:
    """What the engine does after a speculative step: append the committed tokens, count accepted proposals."""
    scheduler.finish_step(out)
    for chunk in out.chunks:
        tokens = committed[chunk.request.request_id]
        drafts = chunk.draft_token_ids
        accepted = next((i for i, (t, d) in enumerate(zip(tokens, drafts)) if t != d), min(len(tokens) - 1, len(drafts)))
        chunk.request.output_token_ids.extend(tokens[:accepted + 1])
        scheduler.commit_drafts(chunk.request, accepted)
    scheduler.kv_cache.check_invariants()


def test_proposals_are_scheduled_with_the_last_token_and_rejected_ones_roll_back():
    scheduler, kv = make()
    a = decoding(scheduler, "a", 6)
    assert a.num_computed_tokens == 6 and a.num_tokens == 7
    out = scheduler.schedule({"a": [3, 4, 5]})
    (chunk,) = out.chunks
    assert (chunk.num_computed_tokens, chunk.num_new_tokens, chunk.draft_token_ids, chunk.samples) == (6, 4, [3, 4, 5], True)
    assert len(kv.block_tables("a")[0]) == 3  # slots for positions 6..9: blocks 1 and 2 of 4 tokens
    verify(scheduler, out, {"a": [3, 9]})  # first accepted, second rejected: 3 then the target's 9
    assert a.output_token_ids == [7, 3, 9] and a.num_computed_tokens == 8 == a.num_tokens - 1
    out = scheduler.schedule()  # a plain decode continues from the rolled-back count
    assert [(c.num_computed_tokens, c.num_new_tokens, c.draft_token_ids) for c in out.chunks] == [(8, 1, [])]


def test_all_accepted_advances_past_every_proposal():
    scheduler, _ = make()
    a = decoding(scheduler, "a", 5)
    out = scheduler.schedule({"a": [1, 2]})
    verify(scheduler, out, {"a": [1, 2, 3]})
    assert a.output_token_ids == [7, 1, 2, 3] and a.num_computed_tokens == a.num_tokens - 1 == 8


def test_prefix_cache_registers_only_blocks_of_committed_tokens():
    scheduler, kv = make(block_size=4)
    a = decoding(scheduler, "a", 6)  # tokens 0..5 prompt, 6 is the first output
    out = scheduler.schedule({"a": [3, 4, 5, 6]})  # writes positions 6..10: block 1 fills with proposals
    verify(scheduler, out, {"a": [8]})  # nothing accepted
    assert a.num_computed_tokens == 7
    registered = [kv.pools[0].lookup(h) for h in kv._hashes["a"]]
    # Block 0 (positions 0..3) is full of prompt tokens; block 1 holds rejected proposals past position 6.
    assert registered[0] is not None and all(block is None for block in registered[1:])


def test_proposals_fit_the_budget_and_the_length_limit():
    scheduler, _ = make(max_batch_tokens=3)
    decoding(scheduler, "a", 4)
    out = scheduler.schedule({"a": [1, 2, 3, 4]})
    assert out.chunks[0].draft_token_ids == [1, 2]  # 1 + 2 tokens fill the budget of 3
    scheduler2, _ = make()
    b = decoding(scheduler2, "b", 4, max_tokens=3)  # one output so far: two more may come
    out = scheduler2.schedule({"b": [1, 2, 3]})
    assert out.chunks[0].draft_token_ids == [1]  # one proposal and its bonus token reach max_tokens
    assert b.token_limit - b.num_tokens == 2


def test_no_room_for_proposals_decodes_one_token_without_preempting():
    scheduler, kv = make(num_blocks=4, block_size=4)
    # Two blocks each; the next token's slot (position 7) is free in block 1, the proposals' are not.
    a, b = decoding_all(scheduler, [("a", 7, 32), ("b", 7, 32)])
    assert kv.num_free_blocks == 0
    out = scheduler.schedule({"a": [1, 2], "b": [3]})
    assert [(c.request.request_id, c.num_new_tokens, c.draft_token_ids) for c in out.chunks] == [("a", 1, []),
                                                                                               ("b", 1, [])]
    assert not out.preempted
    scheduler.finish_step(out)
    kv.check_invariants()
    assert a.num_computed_tokens == b.num_computed_tokens == 8


def test_proposals_for_a_prefilling_request_are_ignored():
    scheduler, _ = make(max_batch_tokens=4)
    request = Request("p", list(range(10, 20)), SamplingParams(max_tokens=4))
    scheduler.add_request(request)
    out = scheduler.schedule({"p": [1, 2]})
    assert [(c.num_new_tokens, c.draft_token_ids) for c in out.chunks] == [(4, [])]
