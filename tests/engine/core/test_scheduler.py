"""The scheduler as pure logic: requests and a KV cache manager in, chunks out; no model."""

from __future__ import annotations

from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.config.resolve import SchedulerSettings
from pagedserve.engine.core.request import FinishReason, Request, RequestStatus, SamplingParams
from pagedserve.engine.core.scheduler import Scheduler


def make(num_blocks=32, block_size=4, max_batch_tokens=16, max_num_seqs=8, policy="fifo", chunked=True,
         bound=None, prefix_caching=True):
    kv = KVCacheManager(block_size, [None], [num_blocks], enable_prefix_caching=prefix_caching)
    config = SchedulerSettings(max_num_seqs, max_batch_tokens, 256, enable_chunked_prefill=chunked, policy=policy,
                               max_prefill_tokens_while_decoding=bound)
    return Scheduler(config, kv), kv


def request(name: str, num_prompt: int, max_tokens: int = 8, first_token: int = 10) -> Request:
    return Request(name, list(range(first_token, first_token + num_prompt)), SamplingParams(max_tokens=max_tokens))


def run_step(scheduler: Scheduler, token: int = 5):
    """Schedule, pretend the model ran, append one token to every sampling chunk."""
    out = scheduler.schedule()
    scheduler.finish_step(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.request.output_token_ids.append(token)
            for child in out.forks.get(chunk.request.request_id, []):
                child.output_token_ids.append(token)
    scheduler.kv_cache.check_invariants()
    return out


def test_long_prompt_is_chunked_and_decodes_go_first():
    scheduler, _ = make(max_batch_tokens=16)
    a, b = request("a", 6), request("b", 30)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = run_step(scheduler)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 6), ("b", 10)]
    assert out.chunks[0].samples and not out.chunks[1].samples
    out = run_step(scheduler)  # a decodes first, b continues its prompt with what is left
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 15)]
    out = run_step(scheduler)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 5)]
    assert out.chunks[1].samples and b.num_computed_tokens == 30


def test_prefill_first_policy_puts_prompts_first():
    scheduler, _ = make(max_batch_tokens=16, policy="prefill_first")
    scheduler.add_request(request("a", 4))
    run_step(scheduler)
    scheduler.add_request(request("b", 20))
    out = run_step(scheduler)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("b", 16)]


def test_out_of_blocks_preempts_newest_and_recomputes_it_later():
    scheduler, kv = make(num_blocks=6, block_size=4, max_batch_tokens=64)
    old, new = request("old", 8), request("new", 8)
    scheduler.add_request(old)
    scheduler.add_request(new)
    run_step(scheduler)  # 2 + 2 blocks
    preempted = []
    for _ in range(8):
        out = run_step(scheduler)
        preempted += [r.request_id for r in out.preempted]
    assert preempted and set(preempted) == {"new"}
    assert old.num_output_tokens == 9
    assert new.status in (RequestStatus.PREEMPTED, RequestStatus.RUNNING)
    scheduler.finish_request(old, FinishReason.LENGTH)
    for _ in range(3):
        run_step(scheduler)
    assert new.status is RequestStatus.RUNNING and new.num_computed_tokens == new.num_tokens - 1


def test_sequence_budget_and_fifo_admission():
    scheduler, _ = make(max_num_seqs=2, max_batch_tokens=64)
    reqs = [request(f"r{i}", 4) for i in range(3)]
    for r in reqs:
        scheduler.add_request(r)
    out = run_step(scheduler)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    scheduler.finish_request(reqs[0], FinishReason.STOP)
    out = run_step(scheduler)
    assert [c.request.request_id for c in out.chunks] == ["r1", "r2"]


def test_fork_shares_prompt_blocks_and_copies_on_write():
    scheduler, kv = make(block_size=4)
    parent = request("p", 6)
    children = [Request("p#1", parent.prompt_token_ids, parent.sampling_params, completion_index=1)]
    scheduler.add_request(parent, children=children)
    out = run_step(scheduler)
    assert out.forks["p"] == children
    parent_table = list(kv.block_tables("p")[0])
    child_table = list(kv.block_tables("p#1")[0])
    assert parent_table == child_table and kv.pools[0].ref_count(parent_table[0]) == 2
    out = run_step(scheduler)  # both write position 6, inside the shared second block
    copies = out.block_copies
    assert len(copies) == 1 and copies[0].src == parent_table[1]
    assert kv.block_tables("p")[0][0] == kv.block_tables("p#1")[0][0], "full prompt blocks stay shared"
    assert kv.block_tables("p")[0][1] != kv.block_tables("p#1")[0][1]


def test_prefix_cache_hit_skips_cached_tokens_but_recomputes_last():
    scheduler, kv = make(block_size=4, max_batch_tokens=64)
    first = request("a", 12)
    scheduler.add_request(first)
    run_step(scheduler)
    scheduler.finish_request(first, FinishReason.STOP)
    again = request("b", 12)
    scheduler.add_request(again)
    out = run_step(scheduler)
    # 3 full blocks cached, but the whole prompt may not be skipped: the last block is recomputed.
    assert out.chunks[0].num_computed_tokens == 8 and out.chunks[0].num_new_tokens == 4
    assert again.num_cached_prompt_tokens == 8


def test_abort_while_waiting_and_running_frees_everything():
    scheduler, kv = make()
    a, b = request("a", 10), request("b", 10)
    scheduler.add_request(a)
    run_step(scheduler)
    scheduler.add_request(b)
    scheduler.finish_request(a, FinishReason.ABORT)
    scheduler.finish_request(b, FinishReason.ABORT)
    assert kv.num_free_blocks == kv.num_total_blocks and scheduler.num_unfinished == 0


# ---- max_prefill_tokens_while_decoding -----------------------------------------------------------------
def chunks_of(out) -> list[tuple[str, int]]:
    return [(c.request.request_id, c.num_new_tokens) for c in out.chunks]


def prefill_tokens(out) -> int:
    """Tokens of the step's prefill chunks: all but those of requests that needed exactly one token."""
    return sum(c.num_new_tokens for c in out.chunks if c.num_new_tokens > 1 or c.num_computed_tokens == 0)


def test_prompt_tokens_beside_decodes_stay_within_the_bound():
    scheduler, _ = make(max_batch_tokens=64, bound=8)
    a = request("a", 4, max_tokens=30)
    scheduler.add_request(a)
    run_step(scheduler)
    b, c = request("b", 30, first_token=50), request("c", 6, first_token=90)
    scheduler.add_request(b)
    scheduler.add_request(c)
    out = run_step(scheduler)  # a decodes: b's first chunk is the bound, c waits behind it (FIFO)
    assert chunks_of(out) == [("a", 1), ("b", 8)]
    while b.num_computed_tokens < b.num_prompt_tokens or c.num_computed_tokens < c.num_prompt_tokens:
        out = run_step(scheduler)
        assert ("a", 1) in chunks_of(out) and prefill_tokens(out) <= 8
    # b's 30 prompt tokens took 4 steps of 8 beside a's decodes: 8 + 8 + 8 + 6, then c had 2 tokens left.
    assert b.num_output_tokens >= 1 and c.num_output_tokens == 1


def test_a_step_without_decodes_keeps_the_full_budget():
    scheduler, _ = make(max_batch_tokens=64, bound=8)
    scheduler.add_request(request("a", 30))
    scheduler.add_request(request("b", 20, first_token=50))
    out = run_step(scheduler)
    assert chunks_of(out) == [("a", 30), ("b", 20)]
    # Without a bound the same step beside a decode would take 63 prompt tokens; with it, 8.
    scheduler.add_request(request("c", 40, first_token=90))
    scheduler.finish_request(scheduler.running[1], FinishReason.STOP)
    out = run_step(scheduler)
    assert chunks_of(out) == [("a", 1), ("c", 8)]


def test_a_prompt_chunked_alone_is_no_decode_and_keeps_the_full_budget():
    scheduler, _ = make(max_batch_tokens=16, bound=4)
    scheduler.add_request(request("a", 40))
    assert [chunks_of(run_step(scheduler)) for _ in range(3)] == [[("a", 16)], [("a", 16)], [("a", 8)]]


def test_the_bound_can_change_between_steps():
    scheduler, _ = make(max_batch_tokens=64, bound=None)
    scheduler.add_request(request("a", 4, max_tokens=30))
    run_step(scheduler)
    scheduler.add_request(request("b", 40, first_token=50))
    scheduler.config = scheduler.config.updated(max_prefill_tokens_while_decoding=5)
    assert chunks_of(run_step(scheduler)) == [("a", 1), ("b", 5)]
    scheduler.config = scheduler.config.updated(max_prefill_tokens_while_decoding=None)
    assert chunks_of(run_step(scheduler)) == [("a", 1), ("b", 35)]


def test_prefill_first_puts_prompts_first_within_the_bound():
    scheduler, _ = make(max_batch_tokens=64, policy="prefill_first", bound=8)
    scheduler.add_request(request("a", 4, max_tokens=30))
    run_step(scheduler)
    scheduler.add_request(request("b", 20, first_token=50))
    assert chunks_of(run_step(scheduler)) == [("b", 8), ("a", 1)]
    assert chunks_of(run_step(scheduler)) == [("a", 1), ("b", 8)]  # b runs now: its next chunk, in running order


def test_without_chunking_a_prompt_past_the_bound_is_admitted_whole_as_the_first_prefill():
    # A prompt cannot be split: waiting for a step without decodes could take for ever while decodes keep
    # coming, so the step's first prefill passes the bound; later ones only fit within what it left.
    scheduler, _ = make(max_batch_tokens=256, chunked=False, bound=8)
    decoders = [request(f"d{i}", 4, max_tokens=200, first_token=10 + i) for i in range(2)]
    for decoder in decoders:
        scheduler.add_request(decoder)
    run_step(scheduler)
    long, short, tiny = request("long", 40, first_token=50), request("short", 6, first_token=100), request(
        "tiny", 2, first_token=120)
    for waiting in (long, short, tiny):
        scheduler.add_request(waiting)
    out = run_step(scheduler)
    assert chunks_of(out) == [("d0", 1), ("d1", 1), ("long", 40)]  # whole, past the bound; short waits
    out = run_step(scheduler)  # short (6) and tiny (2) are 8 together: both fit the bound
    assert chunks_of(out) == [("d0", 1), ("d1", 1), ("long", 1), ("short", 6), ("tiny", 2)]
    assert long.num_output_tokens == 2 and all(r.status is RequestStatus.RUNNING for r in (short, tiny))


def test_without_chunking_prompts_within_the_bound_share_a_step_and_the_rest_wait():
    scheduler, _ = make(max_batch_tokens=256, chunked=False, bound=8)
    scheduler.add_request(request("d", 4, max_tokens=200))
    run_step(scheduler)
    for name, first in (("p", 40), ("q", 60), ("r", 80)):
        scheduler.add_request(request(name, 3, first_token=first))
    assert chunks_of(run_step(scheduler)) == [("d", 1), ("p", 3), ("q", 3)]  # r would make 9 > 8
    assert chunks_of(run_step(scheduler))[-1] == ("r", 3)


def test_a_preempted_requests_recompute_counts_as_prefill_under_the_bound():
    scheduler, _ = make(num_blocks=9, block_size=4, max_batch_tokens=64, bound=4, prefix_caching=False)
    old, mid, new = (request(name, 8, max_tokens=30, first_token=10 + 20 * i)
                     for i, name in enumerate(("old", "mid", "new")))
    for r in (old, mid, new):
        scheduler.add_request(r)
    out = run_step(scheduler)
    assert prefill_tokens(out) == 24  # nothing decodes yet: the full budget
    while not out.preempted:
        out = run_step(scheduler)
    assert [r.request_id for r in out.preempted] == ["new"]
    scheduler.finish_request(mid, FinishReason.ABORT)  # room enough to recompute new whole at once
    num_to_recompute = new.num_tokens
    recompute_chunks = []
    while new.num_computed_tokens < num_to_recompute:
        out = run_step(scheduler)
        assert ("old", 1) in chunks_of(out)
        recompute_chunks += [n for name, n in chunks_of(out) if name == "new"]
    # Whole (13 tokens) without the bound; here chunks of at most 4 beside old's decodes.
    assert max(recompute_chunks) == 4 and sum(recompute_chunks) == num_to_recompute == 13
    assert chunks_of(run_step(scheduler)) == [("old", 1), ("new", 1)]


def test_forked_children_are_decodes_from_the_next_step():
    scheduler, _ = make(max_batch_tokens=64, bound=8)
    parent = request("p", 6, max_tokens=30)
    children = [Request("p#1", parent.prompt_token_ids, parent.sampling_params, completion_index=1)]
    scheduler.add_request(parent, children=children)
    out = run_step(scheduler)
    assert chunks_of(out) == [("p", 6)] and out.forks["p"] == children
    scheduler.add_request(request("q", 30, first_token=60))
    assert chunks_of(run_step(scheduler)) == [("p", 1), ("p#1", 1), ("q", 8)]


def test_a_step_runs_at_most_max_loras_adapters_and_the_queue_head_waits_for_room():
    kv = KVCacheManager(4, [None], [64], enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerSettings(8, 64, 256, max_loras=2), kv)
    names = ["x", "y", None, "z", "x"]
    requests = [request(f"r{i}", 3) for i in range(len(names))]
    for req, name in zip(requests, names):
        req.lora_name = name
        scheduler.add_request(req)
    out = run_step(scheduler)
    # x, y and the base run; z would be a third adapter, so it and everything behind it wait (FIFO).
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1", "r2"] and out.lora_names == {"x", "y"}
    scheduler.finish_request(requests[1], FinishReason.STOP)
    out = run_step(scheduler)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r2", "r3", "r4"] and out.lora_names == {"x", "z"}
