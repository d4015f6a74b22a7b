"""Speculative decoding (ngram) through the engine: the output is exactly the plain engine's.

Random-weight tiny models fall into loops, and the prompts repeat themselves, so proposals do get accepted
(each test checks that they did). Greedy: token for token and logprobs; seeded sampling: the same tokens
too (each committed token is the one plain decoding draws with the same noise: engine/spec/verify.py); a
statistical test compares unrelated seeds' token frequencies with and without speculation.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import pytest
import torch

from pagedserve.engine.core.request import Continuation, SamplingParams
from pagedserve.engine.core.step_cost import StepShape
from pagedserve.engine.llm import LLM
from pagedserve.engine.runner.cuda_graphs import DecodeGraphs, GreedyChainGraphs
from graph_like_attention import GraphLikeReference

REPEATING = [
    [5, 9, 33, 7, 81, 12, 40, 41, 42, 5, 9, 33, 7, 81, 12, 40, 41, 42, 5, 9],
    [60, 61, 62, 63, 60, 61, 62, 63, 60, 61],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 100, 101, 102],
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def make_llm(model_dir, **config) -> LLM:
    """The constant rule (`speculative_adaptive=False`): every step within the batch bound speculates, so every test
    here exercises verification whatever this CPU's timings make the adaptive rule decide (test_adaptive.py). On
    the CPU on any machine: the "graphs" of the graph tests rerun their forward there (a GPU's capture takes no
    host reads); the GPU tests below build their own engines."""
    return LLM(str(model_dir), dtype="float32",
               **{"device": "cpu", "block_size": 8, "num_blocks": 96, "speculative_adaptive": False, **config})


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return make_llm(tiny_model_dir("llama"))


def generate(llm: LLM, prompts, params):
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.kv_cache.check_invariants()
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return outputs


def completions(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs] for out in outputs]


def assert_same_outputs(outputs, reference) -> None:
    """Token for token, and each position's top logprobs (ids, ranks, values to 1e-4), as the plain run's."""
    assert completions(outputs) == completions(reference)
    for out, ref in zip(outputs, reference):
        for got, want in zip(out.outputs[0].logprobs, ref.outputs[0].logprobs):
            assert got.keys() == want.keys()
            for token_id in got:
                assert got[token_id].logprob == pytest.approx(want[token_id].logprob, abs=1e-4)
                assert got[token_id].rank == want[token_id].rank


def assert_accepted(llm: LLM, k: int | None = None) -> None:
    """Some proposals were accepted; with `k`, the per-position counts cover k positions and add up."""
    counts = llm.engine.get_stats().spec_decode
    assert counts.num_accepted_tokens > 0, counts
    if k is not None:
        assert len(counts.num_accepted_tokens_per_pos) == k
        assert sum(counts.num_accepted_tokens_per_pos) == counts.num_accepted_tokens


# k = 3, both architectures: test_verification_in_graphs_equals_eager.
@pytest.mark.parametrize(("arch", "k"), [("llama", 5), ("gemma2", 1)])
def test_greedy_output_and_logprobs_equal_plain(tiny_model_dir, arch, k):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    reference = generate(make_llm(tiny_model_dir(arch)), REPEATING, params)
    llm = make_llm(tiny_model_dir(arch), speculative_method="ngram", num_speculative_tokens=k)
    outputs = generate(llm, REPEATING, params)
    assert_same_outputs(outputs, reference)
    assert_accepted(llm, k)


def test_chunked_prefill_prefix_caching_and_preemption(tiny_model_dir, plain):
    shared = REPEATING[0] * 2
    prompts = [shared + [7, 8], shared + [9], REPEATING[1] * 3, REPEATING[2]]
    config = dict(num_blocks=14, max_batch_tokens=16, speculative_disable_batch_size=8)
    reference = generate(make_llm(tiny_model_dir("llama"), **config), prompts, GREEDY)
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=4, **config)
    outputs = generate(llm, prompts, GREEDY)
    assert completions(outputs) == completions(reference)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0 and stats.num_prefix_cache_hits_total > 0
    assert_accepted(llm)


def test_max_tokens_stop_ids_and_stop_strings_inside_accepted_runs(tiny_model_dir, plain):
    prompt = REPEATING[0]
    full = generate(plain, [prompt], GREEDY)[0].outputs[0]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in range(1, 30)]
    params += [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[token]) for token in set(full.token_ids)]
    words = full.text.split()
    params += [SamplingParams(temperature=0, max_tokens=40, stop=[" ".join(words[i:i + 2])], ignore_eos=True)
               for i in range(2, 20, 3)]
    params += [SamplingParams(temperature=0, max_tokens=40, stop=[" ".join(words[i:i + 2])], ignore_eos=True,
                              include_stop_str_in_output=True) for i in range(4, 20, 5)]
    prompts = [prompt] * len(params)
    reference = generate(plain, prompts, params)
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=5,
                   speculative_disable_batch_size=len(prompts))
    assert completions(generate(llm, prompts, params)) == completions(reference)
    assert_accepted(llm)


def test_seeded_sampling_and_n_equal_plain(tiny_model_dir, plain):
    params = [SamplingParams(temperature=0.7, top_k=4, seed=seed, max_tokens=30, ignore_eos=True, logprobs=0)
              for seed in range(6)]
    params.append(SamplingParams(n=3, temperature=0.6, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True))
    prompts = [REPEATING[i % 3] for i in range(len(params))]
    reference = generate(plain, prompts, params)
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3,
                   speculative_disable_batch_size=16)
    first = generate(llm, prompts, params)
    assert completions(first) == completions(reference)
    assert completions(generate(llm, prompts, params)) == completions(first)  # reproducible
    assert_accepted(llm)


def test_sampled_distribution_is_preserved(tiny_model_dir, plain):
    """Frequencies of consecutive token pairs at output positions 1..4 (the ones proposals cover), unrelated
    seeds with and without speculation: pairs, because a wrong acceptance rule shows in how a token follows
    the one before it more than in single tokens' frequencies. A sanity bound (400 samples a side, about 0.1 of
    total variation by chance here); the sharp check is the seeded equality above."""
    num_samples = 400

    def frequencies(llm: LLM, first_seed: int) -> list[collections.Counter]:
        params = [SamplingParams(temperature=0.8, top_k=3, seed=first_seed + i, max_tokens=5, ignore_eos=True)
                  for i in range(num_samples)]
        outputs = generate(llm, [REPEATING[1]] * num_samples, params)
        return [collections.Counter(tuple(out.outputs[0].token_ids[p:p + 2]) for out in outputs) for p in (1, 3)]

    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3,
                   speculative_disable_batch_size=num_samples)
    with_spec, without = frequencies(llm, 0), frequencies(plain, 10_000)
    assert_accepted(llm)
    for got, want in zip(with_spec, without):
        total_variation = sum(abs(got[t] - want[t]) for t in got.keys() | want.keys()) / (2 * num_samples)
        assert total_variation < 0.15, (total_variation, got, want)


def test_pipelined_verifications_keep_the_output(tiny_model_dir, plain):
    """A verification whose requests all have proposals (n-gram, async scheduling) is followed by the next before
    its tokens arrive, on the guess that it accepts them all and samples the token the lookup expects after them;
    where the guess fails, the new step's rows are dropped (engine/core/llm_engine.py, `_pipelined_step`). Each
    request alone, as a single user's stream runs: lengths, stop ids and stop strings ending inside accepted runs,
    logprobs; the output is plain's, and steps were both kept and dropped."""
    prompt = REPEATING[0]
    full = generate(plain, [prompt], GREEDY)[0].outputs[0]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2) for n in (1, 2, 3, 5, 8, 13, 40)]
    params += [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[token])
               for token in sorted(set(full.token_ids))[:5]]
    words = full.text.split()
    params += [SamplingParams(temperature=0, max_tokens=40, stop=[" ".join(words[i:i + 2])], ignore_eos=True,
                              include_stop_str_in_output=i % 2 == 0) for i in range(2, 20, 4)]
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3)
    for request_params in params:
        outputs, reference = (generate(engine, [prompt], request_params) for engine in (llm, plain))
        if request_params.logprobs is not None:
            assert_same_outputs(outputs, reference)
        assert completions(outputs) == completions(reference), request_params
    counts = llm.engine.get_stats().spec_decode
    assert counts.num_pipelined_steps > counts.num_pipelined_voids > 0, counts
    # Two at once: a step kept for one request can be dropped for the other (its rows skipped at delivery).
    partly_dropped = []
    deliver = llm.engine._deliver

    def delivering(step):
        if step.void and len(step.void) < len({request.request_id for request in step.requests}):
            partly_dropped.append(step)
        return deliver(step)

    llm.engine._deliver = delivering
    prompts, longer = [prompt, prompt[2:]], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    assert completions(generate(llm, prompts, longer)) == completions(generate(plain, prompts, longer))
    assert partly_dropped
    # Unseeded sampling pipelines too (a seeded request never does: its draws are settled in order). Its tokens
    # cannot be compared; a kept step's rows were sampled from the right context, with draws of their own.
    sampled = SamplingParams(temperature=0.8, top_k=3, max_tokens=24, ignore_eos=True)
    before = counts.num_pipelined_steps
    for _ in range(4):
        completion = generate(llm, [REPEATING[1]], sampled)[0].outputs[0]
        assert len(completion.token_ids) == 24 and completion.finish_reason == "length"
    assert llm.engine.get_stats().spec_decode.num_pipelined_steps > before
    serial = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3,
                      speculative_pipelining=False)
    assert completions(generate(serial, [prompt], GREEDY)) == completions(generate(plain, [prompt], GREEDY))
    assert serial.engine.get_stats().spec_decode.num_pipelined_steps == 0


def record_deliveries(llm: LLM) -> list:
    """Each step the engine delivers, in order: (request ids of its rows, ids whose rows were dropped)."""
    delivered = []
    deliver = llm.engine._deliver

    def delivering(step):
        delivered.append((list(dict.fromkeys(r.request_id for r in step.requests)), set(step.void)))
        return deliver(step)

    llm.engine._deliver = delivering
    return delivered


def test_a_request_dropped_from_a_pipelined_step_gets_a_real_step_next(tiny_model_dir, plain):
    """A request whose rows a pipelined step dropped has no verification in flight: the next step cannot be guessed
    for it from the dropped step's proposals. It was, and its rows were dropped again in every step while another
    request's guesses held (16 steps in a row here): it made no progress until the others' chain broke."""
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3)
    delivered = record_deliveries(llm)
    prompts = [REPEATING[0], REPEATING[0][2:], REPEATING[1]]
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    assert completions(generate(llm, prompts, params)) == completions(generate(plain, prompts, params))
    assert any(void and len(void) < len(ids) for ids, void in delivered), delivered  # steps partly dropped
    last_dropped: dict[str, bool] = {}
    for ids, void in delivered:
        for request_id in ids:
            assert not (last_dropped.get(request_id) and request_id in void), (request_id, delivered)
            last_dropped[request_id] = request_id in void


def test_a_request_that_ends_is_no_pipelined_void(tiny_model_dir, plain):
    """`num_pipelined_voids` counts requests dropped from a pipelined step because the guess was wrong (the
    metric's meaning). A request that ends (here at a stop token) in the delivery of the verification before it
    has its rows skipped as finished, whatever the guess: it was counted as a void."""
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3)
    engine = llm.engine
    num_ends_beside_a_pipelined_step = 0
    for prompt in REPEATING:
        full = generate(plain, [prompt], GREEDY)[0].outputs[0].token_ids
        for stop_token in sorted(set(full)):
            params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token])
            engine.add_request("stops", prompt, params)
            while engine.has_unfinished_requests():
                before = engine.get_stats().spec_decode
                ended = any(output.finished for output in engine.step())
                after = engine.get_stats().spec_decode
                if ended:  # the step that delivered its stop token: nothing else was dropped from a guess
                    num_ends_beside_a_pipelined_step += after.num_pipelined_steps - before.num_pipelined_steps
                    assert after.num_pipelined_voids == before.num_pipelined_voids, (prompt, stop_token)
            engine.kv_cache.check_invariants()
            assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
    assert num_ends_beside_a_pipelined_step > 0


def test_pipelined_verifications_under_memory_pressure(tiny_model_dir):
    """A pipelined step whose guessed positions' blocks do not all fit launches nothing (the blocks taken for the
    others stay with them) and the step is scheduled as usual, preempting where blocks run out. Three requests in
    9 blocks of 8: the output and logprobs are plain's, and every block comes back."""
    config = dict(num_blocks=9, block_size=8)
    prompts = [REPEATING[0][2:], REPEATING[0][4:], REPEATING[1]]
    params = SamplingParams(temperature=0, max_tokens=42, ignore_eos=True, logprobs=1)
    reference = generate(make_llm(tiny_model_dir("llama"), **config), prompts, params)
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3, **config)
    engine = llm.engine
    refused_in_pipelined_steps = []
    allocate_slots, pipelined_step = engine.kv_cache.allocate_slots, engine._pipelined_step

    def pipelining(preparing_at):
        engine.kv_cache.allocate_slots = lambda *args: allocate_slots(*args) or refused_in_pipelined_steps.append(args)
        try:
            return pipelined_step(preparing_at)
        finally:
            engine.kv_cache.allocate_slots = allocate_slots

    engine._pipelined_step = pipelining
    assert_same_outputs(generate(llm, prompts, params), reference)
    assert refused_in_pipelined_steps and engine.get_stats().num_preemptions_total > 0
    assert engine.get_stats().spec_decode.num_pipelined_steps > 0


def test_pipelined_verifications_with_n_and_seeds(tiny_model_dir, plain):
    """Forked completions (n > 1) pipeline like any request (each has its own tokens and blocks after the fork):
    greedy, their output and logprobs are plain's. A seeded request never pipelines (its generator's draws are
    settled in order), nor does a step it shares with unseeded ones; its tokens are plain's."""
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3)
    forked = SamplingParams(n=2, temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
    for prompt in REPEATING:
        outputs, reference = generate(llm, [prompt], forked), generate(plain, [prompt], forked)
        assert completions(outputs) == completions(reference)
        for out, ref in zip(outputs[0].outputs, reference[0].outputs):
            assert [entry.keys() for entry in out.logprobs] == [entry.keys() for entry in ref.logprobs]
    assert llm.engine.get_stats().spec_decode.num_pipelined_steps > 0
    seeded = [SamplingParams(temperature=0.7, top_k=4, seed=5, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=4, max_tokens=30, ignore_eos=True)]
    before = llm.engine.get_stats().spec_decode
    outputs = generate(llm, [REPEATING[1], REPEATING[1]], seeded)
    assert completions(outputs)[0] == completions(generate(plain, [REPEATING[1]], seeded[0]))[0]
    after = llm.engine.get_stats().spec_decode
    assert after.num_pipelined_steps == before.num_pipelined_steps and after.num_drafts > before.num_drafts


def test_n_completions_forked_from_a_one_token_last_prompt_chunk(tiny_model_dir, plain):
    """A prompt's last chunk of one token (here 17 = 8 + 8 + 1 under a budget of 8) is one token to compute, as a
    decode is: its request may propose. Its n > 1 completions fork from that chunk's logits, which a verification's
    rows did not give them: the forked one never got a first token, and the engine never finished."""
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3, max_batch_tokens=8)
    engine = llm.engine
    prompt, params = REPEATING[0][:17], SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True)
    engine.add_request("forked", prompt, params)
    streamed: dict[int, list[int]] = collections.defaultdict(list)
    for _ in range(50):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            for completion in output.outputs:
                streamed[completion.index] += completion.token_ids
    assert not engine.has_unfinished_requests(), [(r.request_id, r.num_tokens) for r in engine.scheduler.running]
    reference = generate(plain, [prompt], params)[0].outputs
    assert [streamed[0], streamed[1]] == [completion.token_ids for completion in reference]
    engine.kv_cache.check_invariants()
    assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
    assert_accepted(llm)


@pytest.mark.parametrize("at_pipelined_step", [1, 2, 4])
def test_abort_and_add_while_a_pipelined_step_is_in_flight(tiny_model_dir, plain, at_pipelined_step):
    """Between steps, with a pipelined verification in flight (kept for the requests whose guess held): one of its
    requests is aborted (a client that left: its blocks are freed now, its rows skipped at delivery), and a greedy
    and a seeded request arrive (the next step is scheduled as usual). Every output that ran to its end is plain's
    and every block comes back."""
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3)
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, logprobs=1)
    seeded = SamplingParams(temperature=0.7, top_k=4, seed=3, max_tokens=30, ignore_eos=True)
    arrivals = {"greedy": (REPEATING[2], greedy), "seeded": (REPEATING[1], seeded)}
    engine.add_request("kept", REPEATING[0][2:], greedy)
    engine.add_request("aborted", REPEATING[0], greedy)
    streamed: dict[str, list[int]] = collections.defaultdict(list)
    num_pipelined_in_flight = 0
    while engine.has_unfinished_requests():
        before = engine.get_stats().spec_decode.num_pipelined_steps
        for output in engine.step():
            streamed[output.request_id] += output.outputs[0].token_ids
        if engine._in_flight is not None and engine.get_stats().spec_decode.num_pipelined_steps > before:
            num_pipelined_in_flight += 1
            if num_pipelined_in_flight == at_pipelined_step:
                assert engine.abort("aborted")
                for request_id, (prompt, params) in arrivals.items():
                    engine.add_request(request_id, prompt, params)
    assert num_pipelined_in_flight >= at_pipelined_step
    expected = {"kept": (REPEATING[0][2:], greedy), **arrivals}
    for request_id, (prompt, params) in expected.items():
        assert streamed[request_id] == generate(plain, [prompt], params)[0].outputs[0].token_ids, request_id
    engine.kv_cache.check_invariants()
    assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks


def test_pipelined_verification_times_are_their_own(tiny_model_dir):
    """The step cost model learns each verification's time. One delivered after the next step went out (pipelined)
    has its commits overlap that step, as a plain step's do: its time ends when its tokens arrive. It ended after
    the next step's launch, which on a CPU computes that step: the verification that began a pipelined chain was
    taught about two forwards (and the chain's last step about none)."""
    forward_s = 0.1
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3)
    engine = llm.engine
    execute = engine.runner.execute
    executions_s: list[float] = []

    def slow_execute(*args, **kwargs):
        started = time.perf_counter()
        time.sleep(forward_s)  # a forward the host waits for, as a CPU's is
        logits = execute(*args, **kwargs)
        executions_s.append(time.perf_counter() - started)
        return logits

    engine.runner.execute = slow_execute
    observed: list[tuple[StepShape, float]] = []
    observe = engine.scheduler.observe_step
    engine.scheduler.observe_step = lambda shape, seconds: observed.append((shape, seconds)) or observe(shape, seconds)
    generate(llm, [REPEATING[0][2:]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert engine.get_stats().spec_decode.num_pipelined_steps > 2
    verifications_s = [seconds for shape, seconds in observed if shape.is_speculative]
    longest_s = max(executions_s) + forward_s / 2  # one forward, with room for the host's work around it
    assert all(forward_s <= seconds < longest_s for seconds in verifications_s), (verifications_s, executions_s)


def test_streaming_deltas_with_several_tokens_and_adaptive_batch_rule(tiny_model_dir, plain):
    # Four requests with a threshold of 2: plain steps first, speculative ones once two have finished.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 8, 40, 40)]
    prompts = [REPEATING[0], REPEATING[1], REPEATING[2], REPEATING[0]]
    reference = generate(plain, prompts, params)
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=4,
                   speculative_disable_batch_size=2)
    engine = llm.engine
    for index, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(index), prompt, p)
    streamed: dict[str, list[int]] = collections.defaultdict(list)
    largest_delta = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            tokens = delta.outputs[0].token_ids
            streamed[delta.request_id] += tokens
            largest_delta = max(largest_delta, len(tokens))
    assert [streamed[str(i)] for i in range(4)] == [r.outputs[0].token_ids for r in reference]
    assert largest_delta > 1
    assert_accepted(llm)


def test_penalties_decode_plainly_and_continuations_go_on(tiny_model_dir, plain):
    penalized = SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, ignore_eos=True)
    llm = make_llm(tiny_model_dir("llama"), speculative_method="ngram", num_speculative_tokens=3)
    assert completions(generate(llm, [REPEATING[0]], penalized)) == completions(
        generate(plain, [REPEATING[0]], penalized))
    assert llm.engine.get_stats().spec_decode.num_drafts == 0
    full = generate(plain, [REPEATING[0]], GREEDY)[0].outputs[0].token_ids
    llm.engine.add_request("c", REPEATING[0], GREEDY, continuation=Continuation(tuple(full[:7])))
    rest: list[int] = []
    while llm.engine.has_unfinished_requests():
        for delta in llm.engine.step():
            rest += delta.outputs[0].token_ids
    assert full[:7] + rest == full
    assert_accepted(llm)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_verification_in_graphs_equals_eager(tiny_model_dir, plain, arch):
    """Verification steps replay graphs of k + 1 rows a sequence (engine/runner/cuda_graphs.py): sequences
    with fewer proposals (or none) padded in front, batches padded to a captured size. Off CUDA a "graph"
    reruns its forward over the static inputs, so the padded layout is what is checked here: greedy tokens
    and logprobs equal eager steps', windows and soft-capping (gemma2) included."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    prompts = REPEATING + [REPEATING[0][3:]]
    reference = generate(plain if arch == "llama" else make_llm(tiny_model_dir(arch)), prompts, params)
    k = 3
    llm = make_llm(tiny_model_dir(arch), speculative_method="ngram", num_speculative_tokens=k)
    runner = llm.engine.runner
    runner.backend = GraphLikeReference()
    replays = collections.Counter()
    for name, query_len in (("_decode_graphs", 1), ("_verify_graphs", k + 1)):
        graphs = DecodeGraphs(runner, 4, llm.engine.max_model_len, query_len)
        graphs.capture()
        run = graphs.run

        def counted(step, previous_tokens=None, run=run, query_len=query_len):
            replays[query_len, len(step.query_lens), max(step.query_lens)] += 1
            return run(step, previous_tokens)

        graphs.run = counted
        setattr(runner, name, graphs)
    outputs = generate(llm, prompts, params)
    assert_same_outputs(outputs, reference)
    assert_accepted(llm, k)
    # Both kinds ran, in padded batches (3 of 4 sequences) and with sequences of fewer than k proposals.
    assert any(q == k + 1 and batch == 3 for q, batch, _ in replays), replays
    assert any(q == k + 1 and longest < k + 1 for q, _, longest in replays), replays
    assert any(q == 1 for q, _, _ in replays), replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_layers", [False, True])
def test_verification_graphs_on_gpu_equal_eager(tiny_model_dir, compile_layers):
    """Triton attention, captured verification graphs (k + 1 rows a sequence) and, optionally, compiled layers:
    greedy tokens in float32 equal plain eager decoding's, and the verification steps did replay graphs."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = REPEATING + [REPEATING[0][3:]]
    common = dict(dtype="float32", device="cuda", block_size=8, max_num_seqs=4, compile=compile_layers)
    reference = generate(LLM(str(tiny_model_dir("llama")), enable_cuda_graphs=False, **common), prompts, params)
    llm = LLM(str(tiny_model_dir("llama")), speculative_method="ngram", num_speculative_tokens=3,
              speculative_adaptive=False, **common)
    graphs = llm.engine.runner._verify_graphs
    assert graphs is not None and graphs.query_len == 4
    replayed = []
    run = graphs.run
    graphs.run = lambda step, previous_tokens=None: replayed.append(step) or run(step, previous_tokens)
    assert completions(generate(llm, prompts, params)) == completions(reference)
    assert_accepted(llm)
    assert replayed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipelined_verifications_on_gpu_equal_eager(tiny_model_dir):
    """Pipelined n-gram verifications on a GPU (launched before the one in flight delivers, replaying the verification
    graphs while the sampled tokens of the step before are still on their way): each prompt alone, greedy float32
    tokens equal plain eager decoding's, and steps were both kept and dropped."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    common = dict(dtype="float32", device="cuda", block_size=8, max_num_seqs=4, compile=False)
    plain = LLM(str(tiny_model_dir("llama")), enable_cuda_graphs=False, **common)
    llm = LLM(str(tiny_model_dir("llama")), speculative_method="ngram", num_speculative_tokens=3,
              speculative_adaptive=False, **common)
    for prompt in REPEATING:
        assert completions(generate(llm, [prompt], params)) == completions(generate(plain, [prompt], params))
    counts = llm.engine.get_stats().spec_decode
    assert counts.num_pipelined_steps > counts.num_pipelined_voids > 0, counts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_draft_rounds_replay_one_graph_on_gpu(tiny_model_dir):
    """On a GPU the draft's usual proposal round is one captured chain (GreedyChainGraphs) over Triton attention:
    greedy tokens in float32 equal plain eager decoding's, the chain replayed, and the draft cache gives back every
    block."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = REPEATING + [REPEATING[0][3:]]
    common = dict(dtype="float32", device="cuda", block_size=8, max_num_seqs=4, compile=False)
    reference = generate(LLM(str(tiny_model_dir("llama")), enable_cuda_graphs=False, **common), prompts, params)
    llm = LLM(str(tiny_model_dir("llama")), speculative_method="draft", speculative_model=str(tiny_model_dir("llama")),
              num_speculative_tokens=3, speculative_adaptive=False, **common)
    chain = llm.engine._speculator.proposer.runner._chain_graphs
    assert chain is not None and chain.rounds == 2
    replayed = []
    run_chain = chain.run_chain
    chain.run_chain = lambda step, wanted: replayed.append(len(wanted)) or run_chain(step, wanted)
    assert completions(generate(llm, prompts, params)) == completions(reference)
    assert_accepted(llm)
    assert replayed
    draft_cache = llm.engine._speculator.proposer.kv_cache
    assert draft_cache.num_free_blocks == draft_cache.num_total_blocks


def test_draft_model_proposals_keep_the_output(tiny_model_dir, plain):
    """speculative_method="draft", the model as its own draft: the greedy requests accept every proposal, the
    sampled one those its draws agree with (the rest are rejected: the residual path); the output is plain's,
    greedy and seeded sampling alike, and the draft cache gives back every block."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    params = [greedy, greedy, SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=24, ignore_eos=True)]
    prompts = [REPEATING[0], [7, 3, 99, 12, 5], REPEATING[1]]
    llm = make_llm(tiny_model_dir("llama"), speculative_method="draft", speculative_model=str(tiny_model_dir("llama")),
                   num_speculative_tokens=3)
    assert completions(generate(llm, prompts, params)) == completions(generate(plain, prompts, params))
    counts = llm.engine.get_stats().spec_decode
    assert 0.5 <= counts.acceptance_rate < 1, counts
    draft_cache = llm.engine._speculator.proposer.kv_cache
    draft_cache.check_invariants()
    assert draft_cache.num_free_blocks == draft_cache.num_total_blocks


RECORDING_BACKEND = "pagedserve_test_recording_backend"
RECORDED_GRAPHS: list[list[tuple[str, tuple]]] = []  # per graph: (placeholder, shape) of its tensor inputs


def recording_backend(graph_module, example_inputs):
    RECORDED_GRAPHS.append([(node.name, tuple(node.meta["example_value"].shape)) for node in graph_module.graph.nodes
                            if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor)])
    return graph_module.forward


def test_compiled_draft_of_the_models_class_keeps_its_shapes_static(tiny_model_dir, plain, tmp_path):
    """The draft is compiled as the model is; a draft of the same class with other sizes (2 layers, 1 KV head)
    shares torch.compile's cache of the regions' code. Neither model's graphs take the other's sizes as dynamic
    (only token counts are symbolic), and the output is plain's."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    from torch.fx.experimental.symbolic_shapes import is_concrete_int
    from tiny_models import build_tiny_model

    if RECORDING_BACKEND not in _BACKENDS:
        register_backend(recording_backend, name=RECORDING_BACKEND)
    draft_dir = build_tiny_model("llama", tmp_path / "draft", seed=1, num_hidden_layers=2, num_key_value_heads=1)
    RECORDED_GRAPHS.clear()
    llm = make_llm(tiny_model_dir("llama"), speculative_method="draft", speculative_model=str(draft_dir),
                   num_speculative_tokens=3, compile=True, compile_backend=RECORDING_BACKEND)
    assert llm.engine.runner.is_compiled and llm.engine._speculator.proposer.runner.is_compiled
    prompts = [REPEATING[0], [7, 3, 99, 12, 5]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert completions(generate(llm, prompts, params)) == completions(generate(plain, prompts, params))
    assert llm.engine.get_stats().spec_decode.num_drafts > 0
    assert RECORDED_GRAPHS
    # A size may come as a SymInt of a constant value (after other tests compiled these layers): concrete all the same.
    # Activations are [1, tokens, ...]: only the token count may be symbolic; parameters are static whole.
    symbolic = [(name, shape) for graph in RECORDED_GRAPHS for name, shape in graph
                if not all(is_concrete_int(size) for size in (shape if "_parameters_" in name else shape[2:]))]
    assert not symbolic, symbolic
    # Each model's graphs took its own projections: the fused q/k/v weights of both, [q + 2 kv widths, hidden].
    qkv_shapes = {tuple(int(size) for size in shape) for graph in RECORDED_GRAPHS for name, shape in graph
                  if "q_proj_parameters" in name}
    for runner in (llm.engine.runner, llm.engine._speculator.proposer.runner):
        config = runner.model.config
        head_dim = config.hidden_size // config.num_attention_heads
        width = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
        assert (width, config.hidden_size) in qkv_shapes, (width, qkv_shapes)


def test_draft_rounds_in_one_graph_propose_what_eager_rounds_do(tiny_model_dir, plain):
    """With CUDA graphs a draft model's proposal round is one replay (GreedyChainGraphs: the catch-up and the k - 1
    forwards after it, the proposals fed back and positions, lengths and cache slots advanced on the device). Off
    CUDA its "graph" reruns the same device code over the static inputs: every round proposes what the rounds of a
    forward each propose (padded batches, catch-ups of several tokens after rejections, fewer proposals wanted than
    k near max_tokens), the output is plain's and the draft cache gives back every block."""
    k = 3
    greedy = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
    params = [greedy, SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=23, ignore_eos=True), greedy]
    prompts = [REPEATING[0], REPEATING[1], [7, 3, 99, 12, 5, 44, 81, 2, 19]]
    config = dict(speculative_method="draft", speculative_model=str(tiny_model_dir("llama")), num_speculative_tokens=k)
    logs: dict[str, list[list[list[int]]]] = {}

    def logged(llm: LLM, name: str) -> LLM:
        proposer = llm.engine._speculator.proposer
        propose, logs[name] = proposer.propose_batch, []

        def propose_batch(requests, limits):
            proposals = propose(requests, limits)
            logs[name].append([proposals.get(request.request_id) for request in requests])
            return proposals

        proposer.propose_batch = propose_batch
        return llm

    eager = logged(make_llm(tiny_model_dir("llama"), **config), "eager")
    chained = logged(make_llm(tiny_model_dir("llama"), **config), "chained")
    proposer = chained.engine._speculator.proposer
    runner = proposer.runner
    runner.backend = GraphLikeReference()
    # What the engine does on a GPU (the settings here allow no graphs on a CPU): the draft's decode graphs and
    # its chain graphs, sharing the decode graphs' logits.
    runner.settings = dataclasses.replace(runner.settings, cuda_graphs=True)
    proposer.capture_cuda_graphs(4, chained.engine.max_model_len)
    chain = runner._chain_graphs
    assert isinstance(chain, GreedyChainGraphs) and chain.logits is runner._decode_graphs.logits
    runs = []
    run_chain = chain.run_chain
    chain.run_chain = lambda step, wanted: runs.append((len(step.query_lens), max(step.query_lens), min(wanted))) \
        or run_chain(step, wanted)
    reference = completions(generate(plain, prompts, params))
    assert completions(generate(eager, prompts, params)) == reference
    assert completions(generate(chained, prompts, params)) == reference
    assert logs["chained"] == logs["eager"]
    assert any(batch == 3 for batch, _, _ in runs), runs  # padded to 4
    assert any(longest > 1 for _, longest, _ in runs), runs  # verification rejected something: a longer catch-up
    assert any(fewest < k for _, _, fewest in runs), runs  # near max_tokens
    assert len(runs) < len(logs["chained"])  # the first round of each request (its prompt) ran a forward at a time
    draft_cache = chained.engine._speculator.proposer.kv_cache
    draft_cache.check_invariants()
    assert draft_cache.num_free_blocks == draft_cache.num_total_blocks


def test_lora_adapters_with_speculation_keep_the_output(tiny_model_dir, tmp_path):
    """LoRA adapters with speculative decoding: verification runs each sequence's k + 1 rows under its adapter
    (the step's adapter per sequence). Rows of two adapters (greedy, and seeded sampling) and of the base
    model give the same output as the same adapters without speculation, with proposals accepted."""
    from tiny_models import save_random_lora

    model = tiny_model_dir("llama")
    adapters = {name: save_random_lora(model, tmp_path / name, seed, targets) for seed, (name, targets) in
                enumerate({"attn": ("q_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "down_proj")}.items())}
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=16, ignore_eos=True)
    prompts, params, loras = REPEATING, [greedy, greedy, sampled], ["attn", None, "mlp"]
    plain_lora = make_llm(model, lora_modules=adapters)
    reference = plain_lora.generate(prompts, params, use_tqdm=False, lora=loras)
    assert completions(plain_lora.generate(prompts[:1], params[:1], use_tqdm=False)) != completions(reference[:1])
    llm = make_llm(model, lora_modules=adapters, speculative_method="ngram", num_speculative_tokens=3)
    outputs = llm.generate(prompts, params, use_tqdm=False, lora=loras)
    assert completions(outputs) == completions(reference)
    assert_accepted(llm, 3)
