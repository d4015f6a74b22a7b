"""Engine-level behaviour: seeds, n > 1, stop conditions, logprobs, penalties, errors, abort, async."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.config.engine import ConfigError
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.engine.errors import InvalidRequestError, RequestTooLargeError
from pagedserve.engine.llm import LLM
from pagedserve.engine.core.request import SamplingParams

PROMPTS = [[5, 9, 33, 7, 81, 12], list(range(20, 61)), [100, 101, 102]]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, num_blocks=64)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation="eager").eval()


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    llm.engine.kv_cache.check_invariants()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [unseeded, params, unseeded], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone
    assert_all_blocks_free(llm)


def test_n_completions_share_the_prompt(llm):
    greedy = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    many = llm.generate([PROMPTS[1]], SamplingParams(n=3, temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert all(c.token_ids == greedy.outputs[0].token_ids for c in many.outputs)
    sampled = llm.generate([PROMPTS[1]], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12,
                                                         ignore_eos=True), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1, "n samples must differ"
    again = llm.generate([PROMPTS[1]], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in sampled.outputs]
    assert_all_blocks_free(llm)


def test_max_tokens_min_tokens_eos_and_stop_token_ids(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    ids = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    stop_id = ids[3]
    stopped = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]),
                           use_tqdm=False)[0].outputs[0]
    first = ids.index(stop_id)
    assert stopped.token_ids == ids[: first + 1] and stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    late = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id],
                                                     min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) > first + 1


def test_stop_strings_are_cut_and_never_emitted(llm):
    tokenizer = llm.get_tokenizer()
    full = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    words = full.text.split()
    stop = " ".join(words[4:6])  # spans a token boundary
    cut = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert stop not in cut.text and cut.text == full.text[: full.text.index(stop)]
    assert tokenizer is not None



def test_stop_strings_end_a_request_only_past_min_tokens(llm):
    """A stop string met within min_tokens does not end the request (as a stop id or EOS there would not); one
    met later does, with the text cut before it."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    free = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0]
    tokenizer = llm.engine.tokenizer
    early = tokenizer.decode(free.token_ids[1:2])  # the second token's text: a stop string under min_tokens 4
    assert early.strip() and early in free.text
    stopped = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[early]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 2
    waited = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[early],
                                                       min_tokens=4), use_tqdm=False)[0].outputs[0]
    assert waited.token_ids == free.token_ids[:len(waited.token_ids)] and len(waited.token_ids) > 4
    later = free.text.find(early, len(tokenizer.decode(free.token_ids[:4])))
    if later >= 0:  # the stop string comes again past min_tokens: the request ends there
        assert (waited.finish_reason, waited.stop_reason, waited.text) == ("stop", early, free.text[:later])
    else:
        assert (waited.finish_reason, waited.text) == ("length", free.text)

def test_greedy_logprobs_equal_transformers_scores(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    out = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0]
    ref = hf_model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=6, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, min_new_tokens=6)
    for step, (token_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        reference = torch.log_softmax(ref.logits[step][0].float(), -1)
        assert entry[token_id].logprob == pytest.approx(reference[token_id].item(), abs=1e-4)
        top = torch.topk(reference, 3).indices.tolist()
        assert [t for t, lp in entry.items() if lp.rank is not None][:3] == top
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_repetition_penalty_changes_greedy_like_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.8, ignore_eos=True)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    ref = hf_model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, do_sample=False, repetition_penalty=1.8,
                            min_new_tokens=12)[0, len(PROMPTS[0]):].tolist()
    assert out == ref


def test_impossible_requests_fail_at_once_and_harm_no_one(llm):
    engine = llm.engine
    with pytest.raises(RequestTooLargeError, match=r"needs \d+ tokens \(\d+ in the prompt \+ \d+ to generate\) but this model.s context holds"):
        engine.add_request("too-long", list(range(3, 200)), SamplingParams(max_tokens=400))
    small = LLM(str(llm.engine.runner.model.name_or_path), dtype="float32", block_size=8, num_blocks=10)
    with pytest.raises(RequestTooLargeError, match="but a replica.s whole KV cache holds 80"):
        small.engine.add_request("too-big", list(range(3, 60)), SamplingParams(max_tokens=30))
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("bad-id", [5, 100000], SamplingParams())
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(top_p=0)
    assert error.value.param == "top_p"
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1
    assert_all_blocks_free(llm)


def test_bad_config_names_field_and_range(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"max_memory_percent=1\.5.*less than or equal to 1"):
        LLM(str(tiny_model_dir("llama")), max_memory_percent=1.5)
    with pytest.raises(ConfigError, match="tp_size"):
        LLM(str(tiny_model_dir("llama")), tp_size=3)
    with pytest.raises(ConfigError, match="block_sizee"):
        LLM(str(tiny_model_dir("llama")), block_sizee=16)


def test_abort_frees_blocks_immediately(llm):
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    assert engine.get_stats().num_free_blocks < engine.get_stats().num_total_blocks
    assert engine.abort("a")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    by_id = {o.request_id: o for o in outputs if o.finished}
    assert by_id["a"].outputs[0].finish_reason == "abort"
    assert by_id["b"].outputs[0].finish_reason == "length"
    assert_all_blocks_free(llm)


def test_aborting_n_completions_before_they_fork_ends_and_counts_each(tiny_model_dir):
    """n > 1 completions fork when the prompt's last chunk runs; one aborted before (mid-prompt) still ends every
    completion, each answered with finish_reason abort and counted once."""
    chunked = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, num_blocks=64, max_batch_tokens=16)
    engine = chunked.engine
    engine.add_request("n3", PROMPTS[1] * 3, SamplingParams(n=3, max_tokens=5, ignore_eos=True))
    engine.step()  # the first 16 of the prompt's 123 tokens
    assert engine.abort("n3")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    finished = [completion for output in outputs if output.finished for completion in output.outputs]
    assert sorted(c.index for c in finished) == [0, 1, 2]
    assert {c.finish_reason for c in finished} == {"abort"}
    assert engine.get_stats().finished_by_reason == {"abort": 3}
    assert_all_blocks_free(chunked)


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread-core", "process-core"])
def test_async_engine_streams_deltas_and_frees_blocks_on_disconnect(tiny_model_dir, engine_process):
    engine = AsyncLLMEngine.from_kwargs(model=str(tiny_model_dir("llama")), dtype="float32", block_size=8,
                                        num_blocks=64, engine_process=engine_process)
    sync = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, num_blocks=64)
    want = sync.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]

    async def scenario():
        pieces = []
        async for delta in engine.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), "s1"):
            pieces.append(delta)
        assert pieces[-1].finished and pieces[-1].outputs[0].finish_reason == "length"
        assert sum((p.outputs[0].token_ids for p in pieces), []) == want.token_ids
        assert "".join(p.outputs[0].text for p in pieces) == want.text
        # A consumer that falls behind gets what arrived meanwhile merged into fewer deltas, nothing lost.
        slow = []
        async for delta in engine.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                           "slow"):
            slow.append(delta)
            await asyncio.sleep(0.2)
        assert len(slow) < 12 and slow[-1].finished
        assert sum((p.outputs[0].token_ids for p in slow), []) == want.token_ids
        assert "".join(p.outputs[0].text for p in slow) == want.text
        # A consumer that walks away mid-stream aborts its request.
        stream = engine.generate(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True), "s2")
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            stats = engine.get_stats()
            if stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
        with pytest.raises(RequestTooLargeError):
            async for _ in engine.generate([7] * 500, SamplingParams(max_tokens=100), "s3"):
                pass
        await engine.check_health()

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread-core", "process-core"])
def test_update_scheduler_bounds_prompt_tokens_beside_decodes_on_either_core(tiny_model_dir, engine_process):
    """The bound set on a running engine (as bench/online_engine_bench.py does between passes) holds in its
    steps, and greedy tokens are those of an engine without it."""
    engine = AsyncLLMEngine.from_kwargs(model=str(tiny_model_dir("llama")), dtype="float32", block_size=8,
                                        num_blocks=64, engine_process=engine_process)
    steps = []
    engine.add_step_listener(lambda step, stats: steps.append(step))
    sync = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, num_blocks=64)
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = sync.generate([PROMPTS[1]], short, use_tqdm=False)[0].outputs[0].token_ids

    async def scenario():
        decoding = engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True), "d")
        await decoding.__anext__()  # from here on "d" decodes in every step
        steps.clear()
        got = []
        async for delta in engine.generate(PROMPTS[1], short, "p"):  # 41 prompt tokens
            got += delta.outputs[0].token_ids
        await decoding.aclose()
        return got

    try:
        with pytest.raises(ConfigError, match="max_batch_tokens cannot change on a running engine"):
            engine.update_scheduler(max_batch_tokens=8)
        with pytest.raises(ConfigError, match="max_prefill_tokens_while_decoding=0"):
            engine.update_scheduler(max_prefill_tokens_while_decoding=0)
        engine.update_scheduler(max_prefill_tokens_while_decoding=3)
        assert asyncio.run(scenario()) == want
    finally:
        engine.shutdown()
    beside_decodes = [step.num_prefill_tokens for step in steps if step.num_decode_tokens > 0]
    assert max(beside_decodes) == 3 and sum(beside_decodes) >= 40  # 41 tokens, the last one maybe a "decode"


def test_dummy_load_format_needs_only_the_config(tiny_model_dir, tmp_path):
    """load_format='dummy' builds the architecture with random weights from config.json alone."""
    import shutil

    source = tiny_model_dir("llama")
    bare = tmp_path / "config-only"
    bare.mkdir()
    for path in source.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, bare / path.name)
    # The weights come from EngineConfig.seed (the tiny checkpoint was built from seed 0).
    llm = LLM(str(bare), dtype="float32", block_size=8, num_blocks=32, load_format="dummy", seed=1)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6
    real = AutoModelForCausalLM.from_pretrained(source)
    built = llm.engine.runner.model
    assert type(built) is type(real)
    assert not torch.equal(built.model.layers[0].mlp.up_proj.weight, real.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ConfigError, match="load_format"):
        LLM(str(bare), dtype="float32", load_format="dummy", quantization="bnb-4bit")


def test_priority_policy_keeps_greedy_outputs_and_fifo_refuses_a_priority(llm):
    """Priorities reorder and preempt (64 blocks of 8 cannot hold these six at once), never change tokens;
    under another policy a priority is a bad request naming the field (vLLM's rule)."""
    prompts = [list(range(20 + 7 * i, 100 + 7 * i)) for i in range(6)]  # 12 blocks each at the end: 72 > 64
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
    with pytest.raises(InvalidRequestError, match="scheduling_policy") as refused:
        llm.generate(prompts[:1], params, use_tqdm=False, priority=[1])
    assert refused.value.param == "priority"
    preemptions_before = llm.engine.scheduler.num_preemptions_total
    llm.engine.update_scheduler(policy="priority")
    try:
        got = llm.generate(prompts, params, use_tqdm=False, priority=[3, -1, 0, 2, 0, -1])
    finally:
        llm.engine.update_scheduler(policy="fifo")
    assert [out.outputs[0].token_ids for out in got] == want
    assert llm.engine.scheduler.num_preemptions_total > preemptions_before
    assert_all_blocks_free(llm)


def test_step_time_budget_keeps_greedy_outputs_and_learns_from_the_steps(llm):
    """The ratio rule on a running engine only reorders work: a decoding request and two long prompts give the
    tokens they give without it, while the prompts go 64 tokens a step beside the decode (ratio 1 leaves them
    no time: the floor; no deadline near) and the cost model learns from the steps the engine timed."""
    engine = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True) for max_tokens in (12, 2, 2)]
    prompts = [PROMPTS[0], list(range(30, 180)), [3 + 7 * i % 250 for i in range(100)]]  # 6, 150 and 100 tokens

    def run() -> tuple[list[list[int]], list]:
        tokens: dict[str, list[int]] = {name: [] for name in "dpq"}
        steps = []
        engine.add_request("d", prompts[0], params[0])
        for _ in range(3):  # "d" decodes from its second step on
            for out in engine.step():
                tokens[out.request_id] += out.outputs[0].token_ids
        engine.add_request("p", prompts[1], params[1])
        engine.add_request("q", prompts[2], params[2])
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] += out.outputs[0].token_ids
            steps.append(engine.last_step)
        return [tokens[name] for name in "dpq"], steps

    observed_before = engine.scheduler.step_costs.num_observed
    engine.update_scheduler(prefill_step_time_ratio=1.0, ttft_target_s=3600.0)
    try:
        got, steps = run()  # first: the prompts are not in the prefix cache yet
    finally:
        engine.update_scheduler(prefill_step_time_ratio=None, ttft_target_s=0.5)
    want, _ = run()
    assert got == want
    beside_decodes = [step for step in steps if step is not None and step.num_decode_tokens > 0]
    assert max(step.num_prefill_tokens for step in beside_decodes) == 64
    assert {step.prefill_token_budget for step in beside_decodes if step.num_prefill_tokens} == {64}
    assert engine.scheduler.step_costs.num_observed >= observed_before + 8
    assert_all_blocks_free(llm)
