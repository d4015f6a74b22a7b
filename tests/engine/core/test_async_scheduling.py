"""Async scheduling: step N+1 is scheduled and prepared while step N's tokens are still on the device.

Each request holds a placeholder for its token in flight and the next step's inputs take the token on
the device. These tests hold the async engine to the synchronous one on everything a request can ask
for, and check that no placeholder ever reaches the host-side token lists that prefix caching hashes.
"""

from __future__ import annotations

import pytest

from pagedserve.engine.llm import LLM
from pagedserve.engine.core.request import SamplingParams


def _prompts() -> list[list[int]]:
    return [[5 + (i * 7 + j * 3) % 240 for j in range(6 + 9 * i)] for i in range(8)]


def _params(stop_text: str, stop_id: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True, n=2),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop_text]),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=18, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=12, presence_penalty=0.5, frequency_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]


def _run(model_dir, async_scheduling: bool, **config) -> tuple[list, LLM]:
    llm = LLM(str(model_dir), dtype="float32", block_size=8, async_scheduling=async_scheduling, **config)
    # A stop string and a stop token that greedy decoding meets in the middle of requests 3 and 1.
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    probe = llm.generate([_prompts()[3], _prompts()[1]], greedy, use_tqdm=False)
    stop_text = llm.get_tokenizer().decode([probe[0].outputs[0].token_ids[6]])
    stop_id = probe[1].outputs[0].token_ids[8]
    outputs = llm.generate(_prompts(), _params(stop_text, stop_id), use_tqdm=False)
    return outputs, llm


def _summary(outputs) -> list:
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
          [{t: round(lp.logprob, 5) for t, lp in entry.items()} for entry in (c.logprobs or [])])
         for c in output.outputs]
        for output in outputs
    ]


@pytest.mark.parametrize("config", [{}, {"num_blocks": 16, "max_batch_tokens": 24}], ids=["roomy", "preempting"])
def test_async_scheduling_gives_the_synchronous_outputs(tiny_model_dir, config):
    model_dir = tiny_model_dir("llama")
    sync_outputs, _ = _run(model_dir, False, **config)
    async_outputs, llm = _run(model_dir, True, **config)
    assert _summary(async_outputs) == _summary(sync_outputs)
    reasons = [o.outputs[0].finish_reason for o in async_outputs]
    assert reasons[1] == reasons[3] == "stop", "the mix was meant to stop early"
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    llm.engine.kv_cache.check_invariants()
    assert not llm.engine.has_unfinished_requests()
    if config:
        assert stats.num_preemptions_total > 0, "the small cache was meant to force preemption"


def test_generated_tokens_reach_the_prefix_cache_by_value(tiny_model_dir):
    """The blocks a request fills with its own generated tokens are cached under the tokens' real
    values: a prompt that repeats prompt + output finds them (a placeholder in the hash would miss)."""
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, async_scheduling=True)
    prompt = list(range(30, 50))  # 20 tokens
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    generated = first.outputs[0].token_ids
    assert -1 not in generated and len(generated) == 20
    follow_up = prompt + generated  # 40 tokens; K/V exist for the first 39, so 4 full blocks of 8
    second = llm.generate([follow_up], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                          use_tqdm=False)[0]
    assert second.num_cached_tokens == 32


def test_abort_between_steps_drops_the_token_in_flight(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, async_scheduling=True)
    engine = llm.engine
    engine.add_request("a", list(range(10, 30)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("b", list(range(40, 50)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    delivered = {"a": 0, "b": 0}
    for _ in range(4):
        for output in engine.step():
            delivered[output.request_id] += len(output.outputs[0].token_ids)
    assert engine._in_flight is not None, "a step should be in flight between calls"
    assert engine.abort("a")
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            delivered[output.request_id] += len(output.outputs[0].token_ids)
            if output.finished:
                finished[output.request_id] = output.outputs[0].finish_reason
    assert finished == {"a": "abort", "b": "length"} and delivered["b"] == 5
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    engine.kv_cache.check_invariants()
