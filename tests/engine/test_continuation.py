"""A request that continues a completion begun on an engine that was lost (`Continuation`): cut anywhere,
the tokens, text, finish and logprobs that follow are those the uninterrupted request gave."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest
import torch

from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.engine.errors import InvalidRequestError
from pagedserve.engine.llm import LLM
from pagedserve.engine.core.request import Continuation, SamplingParams

PROMPT = [5, 9, 33, 7, 81, 12, 40, 41]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, num_blocks=64)


@dataclass
class Run:
    token_ids: list[int]
    texts: list[str]  # the text that came out with each token (deltas of one token each)
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: list | None
    cumulative_logprob: float | None

    def text_after(self, num_tokens: int) -> str:
        return "".join(self.texts[num_tokens:])


def run(llm: LLM, params: SamplingParams, continuation: Continuation | None = None,
        request_id: str = "r", others: int = 0) -> Run:
    """One request through the engine's steps (with `others` unrelated requests in the batch)."""
    engine = llm.engine
    for i in range(others):
        engine.add_request(f"other-{i}", [3 + i, 4, 5, 6], SamplingParams(temperature=1.0, max_tokens=24))
    engine.add_request(request_id, PROMPT, params, continuation=continuation)
    result = Run([], [], None, None, [] if params.logprobs is not None else None, None)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id != request_id:
                continue
            # The prompt as sent, without the continued tokens: the service's usage counts it as prompt_tokens.
            assert output.prompt_token_ids == PROMPT
            (completion,) = output.outputs
            assert len(completion.token_ids) <= 1, "one token a step for one request"
            if completion.token_ids:
                result.token_ids += completion.token_ids
                result.texts.append(completion.text)
            elif completion.text:  # text flushed at the end without a token
                result.texts[-1] += completion.text
            if completion.logprobs is not None:
                result.logprobs += completion.logprobs
            result.finish_reason, result.stop_reason = completion.finish_reason, completion.stop_reason
            result.cumulative_logprob = completion.cumulative_logprob
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return result


def check_continues(llm: LLM, params: SamplingParams, cuts: list[int], others: int = 0) -> Run:
    whole = run(llm, params, request_id="whole")
    assert len(whole.token_ids) > max(cuts), "the cut must fall inside the completion"
    for cut in cuts:
        done = whole.token_ids[:cut]
        cumulative = sum(entry[t].logprob for entry, t in zip(whole.logprobs, done)) if whole.logprobs else 0.0
        rest = run(llm, params, Continuation(done, cumulative), request_id=f"cut-{cut}", others=others)
        assert rest.token_ids == whole.token_ids[cut:], f"cut at {cut}"
        assert "".join(rest.texts) == whole.text_after(cut), f"cut at {cut}"
        assert (rest.finish_reason, rest.stop_reason) == (whole.finish_reason, whole.stop_reason)
        if whole.logprobs is not None:
            assert [sorted(e) for e in rest.logprobs] == [sorted(e) for e in whole.logprobs[cut:]]
            assert rest.cumulative_logprob == pytest.approx(whole.cumulative_logprob, abs=1e-4)
    return whole


def test_greedy_continues_where_it_was_cut(llm):
    check_continues(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), cuts=[1, 6, 15])


def test_seeded_sampling_continues_with_the_same_draws(llm):
    """The generator is advanced past the draws of the tokens already sampled, also in a mixed batch;
    penalties see the earlier tokens as output, and logprobs go on from the cumulative value."""
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.5, logprobs=2)
    check_continues(llm, params, cuts=[1, 9, 19], others=2)


def test_min_tokens_counts_the_tokens_already_produced(llm):
    whole = run(llm, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), request_id="whole")
    stop_id = whole.token_ids[10]
    first = whole.token_ids.index(stop_id)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id],
                            min_tokens=first + 2)
    # The stop token's first use falls inside min_tokens: the completion goes on past it.
    check_continues(llm, params, cuts=[first + 1])


def test_text_held_back_for_a_possible_stop_string_comes_out_after_the_cut(llm):
    """A stop string that starts like the text of tokens 4 and 5 but never matches: the engine that was
    lost held that text back when it was cut after token 5; the continuation emits it."""
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    whole = run(llm, greedy, request_id="whole")
    held = (whole.texts[4] + whole.texts[5]).strip()
    assert held, whole.texts
    never = replace(greedy, stop=[held + " NEVER-GENERATED"])
    cut_run = run(llm, never, request_id="check")
    assert cut_run.texts[5] == "" or not cut_run.texts[5].endswith(held), "the cut must hold text back"
    check_continues(llm, never, cuts=[5, 6])
    # A stop string that does match later: the continuation ends where the whole run ended.
    ending = replace(greedy, stop=[(whole.texts[9] + whole.texts[10]).strip()])
    ended = check_continues(llm, ending, cuts=[3, 9])
    assert ended.finish_reason == "stop" and isinstance(ended.stop_reason, str)


def test_a_continuation_that_cannot_go_on_is_refused(llm):
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match="leave none") as error:
        engine.add_request("full", PROMPT, greedy, continuation=Continuation([7, 7, 7, 7]))
    assert error.value.param == "continuation"
    with pytest.raises(InvalidRequestError, match="one completion"):
        engine.add_request("many", PROMPT, replace(greedy, n=2), continuation=Continuation([7]))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("bad", PROMPT, greedy, continuation=Continuation([10**9]))
    whole = run(llm, replace(greedy, max_tokens=12), request_id="whole")
    stopped = replace(greedy, max_tokens=12, stop=[whole.texts[2].strip()])
    with pytest.raises(InvalidRequestError, match="already ends at stop string"):
        engine.add_request("stopped", PROMPT, stopped, continuation=Continuation(whole.token_ids[:5]))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread-core", "process-core"])
def test_the_async_engine_streams_a_continuation(llm, tiny_model_dir, engine_process: bool):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    whole = run(llm, greedy, request_id="whole")
    engine = AsyncLLMEngine.from_kwargs(model=str(tiny_model_dir("llama")), dtype="float32", block_size=8,
                                        num_blocks=64, engine_process=engine_process)

    async def stream() -> list[int]:
        tokens: list[int] = []
        async for output in engine.generate(PROMPT, greedy, "a", continuation=Continuation(whole.token_ids[:4])):
            tokens += output.outputs[0].token_ids
        return tokens

    try:
        assert asyncio.run(stream()) == whole.token_ids[4:]
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_continuations_on_the_gpu(tiny_model_dir):
    """On CUDA (Triton attention, decode graphs, async scheduling) a seeded continuation's generator is
    advanced exactly as the sampling draws advanced it (Philox offsets, not Mersenne Twister state)."""
    gpu = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cuda", block_size=8, max_num_seqs=8,
              compile=False)
    assert gpu.engine.async_scheduling
    check_continues(gpu, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), cuts=[1, 7])
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=77, max_tokens=20, ignore_eos=True,
                            repetition_penalty=1.2, logprobs=1)
    check_continues(gpu, seeded, cuts=[1, 12], others=3)
    gpu.engine.shutdown()
