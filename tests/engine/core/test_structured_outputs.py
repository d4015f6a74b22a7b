"""Structured outputs, logit_bias, allowed_token_ids and bad_words in the engine (offline and async).

A tiny random Llama with a byte-level BPE tokenizer: random weights produce any bytes, so every constrained
output that parses proves the mask, not the model. Random weights also never choose to stop, so the schemas
bound what they allow (integer ranges, string lengths, item counts): an unbounded number would run to
max_tokens, as it may with any model.
"""

from __future__ import annotations

import asyncio
import json
import time

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine.core import grammar as grammar_module
from pagedserve.engine.core.request import Continuation, StructuredOutputsParams
from pagedserve.engine.errors import InvalidRequestError

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2.5, "high", None]},
                                      "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 8}},
     "required": ["level", "ok"]},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                         "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                         "required": ["x", "y"]}},
     "type": "object", "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/point"},
                                                 "minItems": 1, "maxItems": 2}}, "required": ["points"]},
]


def constrained(schema: dict, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=kwargs.pop("max_tokens", 120),
                          structured_outputs=StructuredOutputsParams(json=schema), **kwargs)


@pytest.fixture(scope="module")
def llm(bpe_model_dir) -> LLM:
    engine = LLM(str(bpe_model_dir), num_blocks=512, max_num_seqs=32, seed=0)
    yield engine
    engine.engine.shutdown()


def test_every_output_parses_and_validates_greedy_and_sampled_beside_free_requests(llm) -> None:
    prompts, params = [], []
    for index, schema in enumerate(SCHEMAS):
        for temperature in (0.0, 1.0):
            prompts.append(f"Hello {index}")
            params.append(constrained(schema, temperature=temperature, seed=index))
            prompts.append(f"Paged {index}")
            params.append(SamplingParams(max_tokens=12, temperature=temperature, seed=index))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output, param in zip(outputs, params):
        if param.structured_outputs is None:
            continue
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), param.structured_outputs.json)


def test_free_greedy_outputs_do_not_change_beside_constrained_ones(llm) -> None:
    free = [SamplingParams(max_tokens=16, temperature=0.0) for _ in range(3)]
    alone = llm.generate(["The quick", "Ray Serve", "Paged"], free, use_tqdm=False)
    mixed = llm.generate(["The quick", "x", "Ray Serve", "y", "Paged"],
                         [free[0], constrained(SCHEMAS[0], temperature=0.0), free[1],
                          constrained(SCHEMAS[1], temperature=1.0, seed=3), free[2]], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [mixed[i].outputs[0].token_ids for i in (0, 2, 4)]


def test_regex_choice_grammar_and_json_object(llm) -> None:
    regex, choice, ebnf, any_json = llm.generate(["a", "b", "c", "d"], [
        SamplingParams(max_tokens=20, temperature=1.0, seed=1,
                       structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")),
        SamplingParams(max_tokens=20, temperature=1.0, seed=2,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe so"])),
        SamplingParams(max_tokens=20, temperature=1.0, seed=3,
                       structured_outputs=StructuredOutputsParams(grammar='root ::= ("ab" | "cd")+ "!"')),
        SamplingParams(max_tokens=200, temperature=0.0, structured_outputs=StructuredOutputsParams(json_object=True)),
    ], use_tqdm=False)
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex.outputs[0].text)
    assert choice.outputs[0].text in ("yes", "no", "maybe so")
    assert re.fullmatch(r"(ab|cd)+!", ebnf.outputs[0].text)
    if any_json.outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(any_json.outputs[0].text), dict)


def test_json_object_takes_any_object_and_nothing_else(llm) -> None:
    """`response_format: json_object` is OpenAI's JSON mode: any JSON object (nested values of every kind, free
    whitespace), never an array or a scalar at the top level (xgrammar's built-in JSON grammar allows an array)."""
    import xgrammar

    compiled = llm.engine._grammars().compile(StructuredOutputsParams(json_object=True))

    def accepts(text: str) -> bool:
        return xgrammar.GrammarMatcher(compiled.grammar).accept_string(text)

    for text in ['{}', '{"a": [1, {"b": null}], "c": "x", "d": -1.5e3, "e": true}', '{\n  "k": {}\n}']:
        assert accepts(text), text
    for text in ['[]', '[{"a": 1}]', '"text"', '3', 'null']:
        assert not accepts(text), text


def test_n_completions_each_follow_the_grammar(llm) -> None:
    output = llm.generate(["n"], constrained(SCHEMAS[1], n=4, temperature=1.0, seed=7), use_tqdm=False)[0]
    assert len(output.outputs) == 4
    for completion in output.outputs:
        jsonschema.validate(json.loads(completion.text), SCHEMAS[1])


def test_preemption_keeps_each_matcher_in_step(bpe_model_dir) -> None:
    """A cache too small for the batch preempts and recomputes; the grammars still hold."""
    small = LLM(str(bpe_model_dir), num_blocks=24, block_size=4, max_num_seqs=8, max_batch_tokens=64)
    try:
        params = [constrained(SCHEMAS[i % 2], temperature=1.0, seed=i, max_tokens=60) for i in range(8)]
        outputs = small.generate([f"prompt number {i} " * 2 for i in range(8)], params, use_tqdm=False)
        assert small.engine.scheduler.num_preemptions_total > 0
        for output, param in zip(outputs, params):
            jsonschema.validate(json.loads(output.outputs[0].text), param.structured_outputs.json)
    finally:
        small.engine.shutdown()


def test_a_continuation_resumes_the_matcher(llm) -> None:
    """Tokens produced elsewhere are replayed into the new matcher: the greedy result equals an unbroken run."""
    whole = llm.generate(["resume"], constrained(SCHEMAS[0], temperature=0.0), use_tqdm=False)[0].outputs[0]
    cut = len(whole.token_ids) // 2
    engine = llm.engine
    engine.add_request("cont", "resume", constrained(SCHEMAS[0], temperature=0.0),
                       continuation=Continuation(tuple(whole.token_ids[:cut])))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            tokens += delta.outputs[0].token_ids if delta.outputs else []
        assert not engine.take_refused()
    assert whole.token_ids[:cut] + tokens == whole.token_ids


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_a_continuation_that_already_ended_its_grammar_is_refused_and_fails_no_one(llm, ignore_eos) -> None:
    """A continuation whose tokens end with the grammar's stop token (the choice, then EOS) left a terminated
    matcher on a scheduled request: its first step asked it for a mask, which raised and failed every request
    of that step. It is refused, as a continuation that already ends at a stop string is, and the free request
    beside it is untouched."""
    engine = llm.engine
    free = SamplingParams(max_tokens=8, temperature=0.0)
    (want,) = llm.generate(["beside"], free, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    done = (*tokenizer.encode("yes", add_special_tokens=False), tokenizer.eos_token_id)
    engine.add_request("ended", "resume", SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=ignore_eos,
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"])), continuation=Continuation(done))
    engine.add_request("beside", "beside", free)
    tokens: list[int] = []
    refused: list[tuple[str, Exception]] = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            assert delta.request_id == "beside" and delta.error is None
            tokens += delta.outputs[0].token_ids
        refused += engine.take_refused()
    assert [(rid, type(exc)) for rid, exc in refused] == [("ended", InvalidRequestError)]
    assert "already ends the choice" in str(refused[0][1])
    assert tokens == want.outputs[0].token_ids


def test_bad_constraints_are_invalid_requests_and_the_engine_goes_on(llm) -> None:
    with pytest.raises(InvalidRequestError, match="invalid regex"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(((")), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="invalid JSON schema"):
        llm.generate(["x"], constrained({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="exactly one of"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(InvalidRequestError, match="not JSON"):
        StructuredOutputsParams(json="{oops")
    assert llm.generate(["still here"], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_a_grammar_that_does_not_compile_in_time_is_refused(llm, monkeypatch) -> None:
    engine = llm.engine
    compiler = engine._grammars()
    real_compile = grammar_module.GrammarCompiler._compile

    def slow(self, params):
        time.sleep(0.5)
        return real_compile(self, params)

    monkeypatch.setattr(grammar_module.GrammarCompiler, "_compile", slow)
    monkeypatch.setattr(compiler, "compile_timeout_s", 0.1)
    with pytest.raises(InvalidRequestError, match="did not compile within 0.1 s"):
        llm.generate(["slow"], constrained({"type": "object", "properties": {"q": {"type": "integer"}}}),
                     use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_refusals_reach_the_async_stream_as_errors(bpe_model_dir) -> None:
    from pagedserve.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_kwargs(model=str(bpe_model_dir), num_blocks=64, device="cpu")

    async def run() -> None:
        with pytest.raises(InvalidRequestError, match="invalid regex"):
            async for _ in engine.generate("x", SamplingParams(
                    structured_outputs=StructuredOutputsParams(regex="(((")), request_id="bad"):
                pass
        text = ""
        async for delta in engine.generate("y", constrained(SCHEMAS[1], temperature=0.0), request_id="good"):
            text += delta.outputs[0].text
        jsonschema.validate(json.loads(text), SCHEMAS[1])

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_logit_bias_allowed_token_ids_and_bad_words(llm) -> None:
    forced, banned, allowed = llm.generate(["bias", "bias", "bias"], [
        SamplingParams(max_tokens=6, temperature=1.0, seed=1, logit_bias={42: 100}),
        SamplingParams(max_tokens=6, temperature=0.0),
        SamplingParams(max_tokens=8, temperature=1.0, seed=2, allowed_token_ids=[40, 41, 42]),
    ], use_tqdm=False)
    assert set(forced.outputs[0].token_ids) == {42}
    first = banned.outputs[0].token_ids[0]
    again = llm.generate(["bias"], SamplingParams(max_tokens=6, temperature=0.0, logit_bias={first: -100}),
                         use_tqdm=False)[0]
    assert first not in again.outputs[0].token_ids
    assert set(allowed.outputs[0].token_ids) <= {40, 41, 42}
    word = llm.get_tokenizer().decode(banned.outputs[0].token_ids[:1]).strip()
    clean = llm.generate(["bias"], SamplingParams(max_tokens=6, temperature=0.0, bad_words=[word]), use_tqdm=False)[0]
    assert word not in clean.outputs[0].text
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate(["bias"], SamplingParams(logit_bias={10**6: 1}), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={1: 101})


def test_async_scheduling_gives_the_synchronous_tokens_under_grammars(bpe_model_dir) -> None:
    """The step in flight is delivered after the next forward is queued and before its masks are filled:
    the same tokens as a synchronous engine, constrained and free requests mixed."""
    params = [constrained(SCHEMAS[i % len(SCHEMAS)], temperature=1.0 if i % 2 else 0.0, seed=i) for i in range(6)]
    params += [SamplingParams(max_tokens=10, temperature=1.0, seed=9, repetition_penalty=1.2, bad_words=["the"])]
    prompts = [f"sync {i}" for i in range(len(params))]
    results = []
    for async_scheduling in (False, True):
        engine = LLM(str(bpe_model_dir), num_blocks=256, max_num_seqs=16, async_scheduling=async_scheduling)
        try:
            results.append([o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)])
        finally:
            engine.engine.shutdown()
    assert results[0] == results[1]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_constraint_that_took_eos_under_ignore_eos_ends_and_fails_no_one(bpe_model_dir, async_scheduling) -> None:
    """With ignore_eos, EOS does not end a request, but the grammar that allowed it has terminated: the next
    step asked its matcher for a mask, which raises, and that step failed every request in it (over HTTP, a
    guided_choice with ignore_eos made every request batched beside it a 500). The request now ends there,
    with the text and tokens it has without ignore_eos, and the free request beside it is untouched."""
    engine = LLM(str(bpe_model_dir), num_blocks=256, max_num_seqs=16, async_scheduling=async_scheduling)
    try:
        choice = StructuredOutputsParams(choice=["Paris", "Oslo"])
        free = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        (want_free,) = engine.generate(["free"], free, use_tqdm=False)
        outputs = [engine.generate(["choose", "free"], [SamplingParams(
            n=2, max_tokens=24, temperature=1.0, seed=3, ignore_eos=ignore_eos, structured_outputs=choice),
            free], use_tqdm=False) for ignore_eos in (False, True)]
    finally:
        engine.engine.shutdown()
    (plain, _), (ignoring, beside) = outputs
    assert ignoring.error is None and beside.error is None
    assert [(c.text, c.token_ids, c.finish_reason) for c in ignoring.outputs] == [
        (c.text, c.token_ids, c.finish_reason) for c in plain.outputs]
    assert {c.text for c in ignoring.outputs} <= {"Paris", "Oslo"}
    assert beside.outputs[0].token_ids == want_free.outputs[0].token_ids


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_constraint_shorter_than_min_tokens_ends_where_it_ends(bpe_model_dir, async_scheduling) -> None:
    """min_tokens masks EOS, and once a grammar allows nothing but EOS that left no token: one the grammar
    refuses was sampled and the request failed ("token 0 breaks the request's choice", a 500 over HTTP). The
    constraint wins: the request ends where its grammar does, as without min_tokens, and min_tokens still
    holds for the free request beside it."""
    engine = LLM(str(bpe_model_dir), num_blocks=256, max_num_seqs=16, async_scheduling=async_scheduling)
    schema = {"type": "object", "properties": {"d": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["d"]}
    constraints = [StructuredOutputsParams(choice=["Paris", "Oslo"]), StructuredOutputsParams(json=schema)]
    free = SamplingParams(max_tokens=16, min_tokens=10, temperature=0.0)
    try:
        (want_free,) = engine.generate(["free"], free, use_tqdm=False)
        runs = [engine.generate(["choose", "json", "free"], [
            SamplingParams(n=2, max_tokens=40, min_tokens=min_tokens, temperature=1.0, seed=3,
                           structured_outputs=constraint) for constraint in constraints] + [free], use_tqdm=False)
            for min_tokens in (0, 30)]
    finally:
        engine.engine.shutdown()
    (*without, _), (*with_min_tokens, beside) = runs
    for plain, held in zip(without, with_min_tokens):
        assert held.error is None
        assert [(c.text, c.token_ids, c.finish_reason) for c in held.outputs] == [
            (c.text, c.token_ids, c.finish_reason) for c in plain.outputs]
        assert all(c.finish_reason == "stop" and len(c.token_ids) < 30 for c in held.outputs)
    assert {c.text for c in with_min_tokens[0].outputs} <= {"Paris", "Oslo"}
    assert all(1 <= json.loads(c.text)["d"] <= 7 for c in with_min_tokens[1].outputs)
    assert beside.error is None and beside.outputs[0].token_ids == want_free.outputs[0].token_ids
    assert len(beside.outputs[0].token_ids) >= 10
