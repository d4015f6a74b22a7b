"""The scheduler as pure logic: requests and a KV cache manager in, chunks out; no model."""

from __future__ import annotations

from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.config.resolve import SchedulerSettings
from pagedserve.engine.core.request import FinishReason, Request, RequestStatus, SamplingParams
from pagedserve.engine.core.scheduler import Scheduler


def make(num_blocks=32, block_size=4, max_batch_tokens=16, max_num_seqs=8, policy="fifo", chunked=True):
    kv = KVCacheManager(block_size, [None], [num_blocks], enable_prefix_caching=True)
    config = SchedulerSettings(max_num_seqs, max_batch_tokens, 256, enable_chunked_prefill=chunked, policy=policy)
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
