"""Sampler: greedy is argmax, seeds are batch-independent, processing matches a per-row reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pagedserve.engine.core.request import Request, SamplingParams
from pagedserve.engine.core.sampler import Sampler, _argmax_chunk, apply_logits_processing, greedy_argmax

CPU = torch.device("cpu")
EOS = 3


def _request(request_id: str = "r", prompt: list[int] | None = None, output: list[int] | None = None,
             completion_index: int = 0, **params: object) -> Request:
    request = Request(
        request_id=request_id,
        prompt_token_ids=list(prompt if prompt is not None else [1, 2]),
        sampling_params=SamplingParams(**params),  # type: ignore[arg-type]
        eos_token_ids=frozenset({EOS}),
        completion_index=completion_index,
    )
    request.output_token_ids = list(output or [])
    return request


def _reference_row(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """Plain one-row processing, written from the definitions rather than from the batched code."""
    params = request.sampling_params
    row = logits.to(torch.float32).clone()
    for token in set(request.prompt_token_ids + request.output_token_ids):
        value = row[token].item()
        row[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token in set(request.output_token_ids):
        count = request.output_token_ids.count(token)
        row[token] -= params.frequency_penalty * count + params.presence_penalty
    if request.num_output_tokens < params.min_tokens:
        for token in set(params.stop_token_ids) | (set() if params.ignore_eos else request.eos_token_ids):
            row[token] = -math.inf
    if params.is_greedy:
        return row
    row = row / max(params.temperature, 0.01)
    if params.top_k > 0:
        kth_largest = row.sort(descending=True).values[min(params.top_k, row.numel()) - 1]
        row[row < kth_largest] = -math.inf
    if params.top_p < 1.0:
        ascending = row.sort().indices
        total = 0.0
        probs = row.softmax(dim=0)
        cumulative = probs[ascending].cumsum(dim=0)
        for position, token in enumerate(ascending.tolist()[:-1]):
            total = cumulative[position].item()
            if total <= 1.0 - params.top_p:
                row[token] = -math.inf
    if params.min_p > 0.0:
        probs = row.softmax(dim=0)
        row[probs < params.min_p * probs.max()] = -math.inf
    return row


def test_greedy_is_argmax_of_float32_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 500, generator=generator).to(torch.bfloat16)
    requests = [_request(f"r{i}", temperature=0.0) for i in range(16)]
    output = Sampler(CPU).sample(logits, requests)
    assert output.token_ids == logits.float().argmax(dim=1).tolist()
    assert output.logprobs is None and output.top_logprobs is None


def test_greedy_rows_ignore_sampling_filters() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    requests = [_request(f"r{i}", temperature=0.0, top_k=2, top_p=0.1, min_p=0.9, seed=i) for i in range(4)]
    assert Sampler(CPU).sample(logits, requests).token_ids == logits.argmax(dim=1).tolist()


def _run_steps(sampler: Sampler, batches: list[list[Request]], logits_of: dict[str, torch.Tensor],
               num_steps: int) -> dict[str, list[int]]:
    """Samples `num_steps` tokens for every request; logits per request and step are fixed in advance."""
    tokens: dict[str, list[int]] = {}
    for step in range(num_steps):
        batch = batches[step % len(batches)]
        logits = torch.stack([logits_of[r.request_id][step] for r in batch])
        output = sampler.sample(logits, batch)
        for request, token in zip(batch, output.token_ids):
            request.output_token_ids.append(token)
            tokens.setdefault(request.request_id, []).append(token)
    return tokens


def test_seeded_request_is_independent_of_batch_and_position() -> None:
    num_steps, vocab_size = 12, 64
    generator = torch.Generator().manual_seed(2)
    logits_of = {name: torch.randn(num_steps, vocab_size, generator=generator) for name in "abcd"}
    seeded = {"seed": 1234, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1}

    alone = _run_steps(Sampler(CPU, seed=0), [[_request("a", **seeded)]], logits_of, num_steps)

    a, b, c, d = (_request("a", **seeded), _request("b", temperature=1.0), _request("c", seed=99),
                  _request("d", temperature=0.0))
    # Different neighbours, a different position for "a" at every step, another sampler seed.
    batches = [[b, c, a], [a, d], [d, b, c, a], [c, a, b, d]]
    mixed = _run_steps(Sampler(CPU, seed=77), batches, logits_of, num_steps)
    assert mixed["a"] == alone["a"]
    assert len(set(alone["a"])) > 1  # really sampled, not a degenerate distribution


def test_completions_of_one_seed_differ_and_follow_seed_plus_index() -> None:
    num_steps, vocab_size = 10, 64
    logits_of = {name: torch.zeros(num_steps, vocab_size) for name in ("x", "x#1", "y")}
    batch = [_request("x", seed=5), _request("x#1", seed=5, completion_index=1), _request("y", seed=6)]
    tokens = _run_steps(Sampler(CPU), [batch], logits_of, num_steps)
    assert tokens["x"] != tokens["x#1"]
    assert tokens["x#1"] == tokens["y"]


def test_forget_restarts_a_seeded_stream() -> None:
    sampler = Sampler(CPU)
    logits = torch.zeros(1, 1000)
    first = sampler.sample(logits, [_request("s", seed=3)]).token_ids
    second = sampler.sample(logits, [_request("s", seed=3)]).token_ids
    sampler.forget("s")
    again = sampler.sample(logits, [_request("s", seed=3)]).token_ids
    assert first == again and first != second


def test_penalties_follow_hf_and_openai_definitions() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]])
    request = _request(prompt=[0], output=[1, 2, 2], repetition_penalty=2.0, presence_penalty=0.5,
                       frequency_penalty=0.25, temperature=0.0)
    processed = apply_logits_processing(logits, [request])
    # Token 0 (prompt): 2 / 2. Token 1 (output once): -2 * 2 - 0.25 - 0.5. Token 2 (output twice): 1 / 2 - 0.5 - 0.5.
    assert processed.tolist() == [[1.0, -4.75, -0.5, 0.5, 0.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5, 0.0]]  # the caller's logits are not modified


def test_min_tokens_masks_eos_and_stop_tokens_also_for_greedy() -> None:
    logits = torch.zeros(4, 10)
    logits[:, EOS] = 5.0
    logits[:, 7] = 4.0
    logits[:, 1] = 3.0
    requests = [
        _request("early", temperature=0.0, min_tokens=2, stop_token_ids=[7], output=[5]),
        _request("done", temperature=0.0, min_tokens=2, stop_token_ids=[7], output=[5, 5]),
        _request("ignore_eos", temperature=0.0, min_tokens=2, ignore_eos=True, output=[5]),
        _request("sampled", temperature=0.5, min_tokens=1, stop_token_ids=[7], seed=0),
    ]
    tokens = Sampler(CPU).sample(logits, requests).token_ids
    assert tokens[:3] == [1, EOS, EOS]
    assert tokens[3] not in (EOS, 7)


def test_logprobs_are_raw_log_softmax() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 30, generator=generator)
    requests = [
        _request("a", logprobs=5, temperature=0.7, repetition_penalty=1.5, top_k=3, seed=1),
        _request("b"),
        _request("c", logprobs=0, temperature=0.0),
    ]
    output = Sampler(CPU).sample(logits, requests)
    expected = logits.log_softmax(dim=1)
    assert output.logprobs is not None and output.top_logprobs is not None and output.sampled_ranks is not None
    for row, token in enumerate(output.token_ids):
        assert output.logprobs[row] == pytest.approx(expected[row, token].item(), abs=1e-6)
        rank = int((expected[row] > expected[row, token]).sum()) + 1
        assert output.sampled_ranks[row] == rank
    top_values, top_ids = expected[0].topk(5)
    assert [token for token, _ in output.top_logprobs[0]] == top_ids.tolist()
    assert [value for _, value in output.top_logprobs[0]] == pytest.approx(top_values.tolist(), abs=1e-6)
    assert output.top_logprobs[1] == [] and output.top_logprobs[2] == []
    assert output.sampled_ranks[2] == 1  # greedy picks the top raw token


def test_sampling_frequencies_match_softmax() -> None:
    num_samples = 4000
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 1.5])
    cases = [
        ({"temperature": 1.0}, logits.softmax(dim=0)),
        ({"temperature": 0.5}, (logits / 0.5).softmax(dim=0)),
        ({"temperature": 1.0, "top_k": 2}, torch.tensor([0, 0, 2.0, 0, 0, 1.5]).exp() * (logits >= 1.5)),
    ]
    sampler = Sampler(CPU, seed=11)
    for params, expected in cases:
        expected = expected / expected.sum()
        requests = [_request(f"r{i}", **params) for i in range(num_samples)]
        tokens = sampler.sample(logits.expand(num_samples, -1), requests).token_ids
        counts = torch.bincount(torch.tensor(tokens), minlength=logits.numel()).float() / num_samples
        # 5 standard deviations of a binomial frequency, and exact zeros where probability is 0.
        tolerance = 5 * (expected * (1 - expected) / num_samples).sqrt() + 1e-9
        assert ((counts - expected).abs() <= tolerance).all(), (params, counts, expected)


row_params = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 1e-9, 0.3, 1.0, 1.7]),
    "top_k": st.sampled_from([0, 1, 3, 10, 100]),
    "top_p": st.sampled_from([1.0, 0.9, 0.5, 0.05]),
    "min_p": st.sampled_from([0.0, 0.05, 0.3]),
    "repetition_penalty": st.sampled_from([1.0, 0.8, 1.3]),
    "presence_penalty": st.sampled_from([0.0, 0.5, -1.0]),
    "frequency_penalty": st.sampled_from([0.0, 0.2, -0.4]),
    "min_tokens": st.sampled_from([0, 3]),
    "stop_token_ids": st.sampled_from([[], [7, 8]]),
    "prompt": st.lists(st.integers(0, 39), max_size=6),
    "output": st.lists(st.integers(0, 39), max_size=6),
})


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(row_params, min_size=1, max_size=5), seed=st.integers(0, 2**31))
def test_processing_matches_per_row_reference(rows: list[dict], seed: int) -> None:
    logits = torch.randn(len(rows), 40, generator=torch.Generator().manual_seed(seed)) * 3
    requests = []
    for index, row in enumerate(rows):
        params = dict(row)
        prompt, output = params.pop("prompt"), params.pop("output")
        requests.append(_request(f"r{index}", prompt=prompt, output=output, **params))
    processed = apply_logits_processing(logits, requests)
    for index, request in enumerate(requests):
        expected = _reference_row(logits[index], request)
        assert torch.equal(torch.isinf(processed[index]), torch.isinf(expected)), (index, request.sampling_params)
        finite = ~torch.isinf(expected)
        assert torch.allclose(processed[index][finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_neutral_rows_are_untouched_beside_filtering_rows() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    requests = [
        _request("plain"),
        _request("filtered", top_k=2, top_p=0.5, min_p=0.2),
        _request("greedy", temperature=0.0),
    ]
    processed = apply_logits_processing(logits, requests)
    assert torch.equal(processed[0], logits[0])
    assert torch.equal(processed[2], logits[2])
    assert int(torch.isfinite(processed[1]).sum()) <= 2


def test_tiny_temperature_is_nearly_greedy_and_finite() -> None:
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(5)) * 1e3
    requests = [_request(f"r{i}", temperature=1e-30) for i in range(64)]
    assert torch.isfinite(apply_logits_processing(logits, requests)).all()
    assert Sampler(CPU).sample(logits, requests).token_ids == logits.argmax(dim=1).tolist()


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("vocab", [128256, 1024, 50257, 997])
def test_greedy_argmax_is_argmax_with_ties(rows: int, vocab: int) -> None:
    generator = torch.Generator().manual_seed(rows + vocab)
    logits = torch.randn(rows, vocab, generator=generator).round(decimals=1)  # many ties
    logits[0, vocab // 3] = logits[0, vocab - 1] = 99.0  # a tie across chunks: the first one wins
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=1))
    assert greedy_argmax(logits)[0].item() == vocab // 3


def test_argmax_chunks() -> None:
    assert _argmax_chunk(128256) == 256  # 501 chunks
    assert _argmax_chunk(50257) == 1733  # 29 x 1733
    assert _argmax_chunk(997) is None  # prime: one stage
    assert _argmax_chunk(1024) is None  # fewer than 16 chunks of 256 or more
