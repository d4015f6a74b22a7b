"""The reference backend against a per-query loop written straight from the semantics in `base.py`.

The loop walks each query token's visible positions one by one (causal, sliding window `k > q - W`),
reads each key through the block table, soft-caps, and takes a float64 softmax. The batches come from
`test_backends.build_batch` (shuffled block ids, decode rows mixed with chunked prefills); then every block
nothing may read (unused blocks, table padding, stale entries behind a sliding window) is filled with NaN,
so a read of one would turn the output NaN.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from pagedserve.engine.kernels.attention.reference import ReferenceAttentionBackend, dequantize_kv, quantize_kv


def _load_backend_tests():
    """test_backends.py by path: the batch builder and cases are shared, and tests/ is not a package."""
    path = Path(__file__).with_name("test_backends.py")
    spec = importlib.util.spec_from_file_location("pagedserve_tests_attention_backends", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


_backend_tests = _load_backend_tests()
CPU_CASES, Case, build_batch = _backend_tests.CPU_CASES, _backend_tests.Case, _backend_tests.build_batch

CASES = CPU_CASES + [
    Case("decode_only_window_longer_than_some", 4, 2, 16, 8, (1, 1, 1, 1), (3, 40, 17, 9), sliding_window=10),
    Case("prefill_only_mha", 2, 2, 16, 8, (12, 30), (12, 45)),
    Case("prefill_only_gqa_window_softcap", 6, 2, 8, 4, (9, 5), (30, 5), sliding_window=6, softcap=2.0),
    Case("window_one", 4, 2, 8, 4, (1, 6, 1), (20, 13, 1), sliding_window=1),
    Case("mixed_gqa6_bf16", 6, 1, 16, 16, (1, 14, 1, 2), (50, 14, 33, 70), dtype="bfloat16", max_rel_error=1e-2),
]


def loop_attention(batch, case: Case) -> torch.Tensor:
    """[T, H, D] float64, one query token and one key position at a time (an FP8 cache's entries times
    their scale)."""
    key_cache, value_cache = batch.key_cache.double(), batch.value_cache.double()
    if batch.kv_scales is not None:
        key_cache, value_cache = key_cache * batch.kv_scales[0].item(), value_cache * batch.kv_scales[1].item()
    tables = batch.group.block_tables.tolist()
    group_size = case.num_heads // case.num_kv_heads
    scale = case.head_dim**-0.5
    rows = []
    token = 0
    for seq, (seq_len, query_len) in enumerate(zip(case.seq_lens, case.query_lens)):
        for query_position in range(seq_len - query_len, seq_len):
            query = batch.query[token].double()
            token += 1
            first = 0 if case.sliding_window is None else max(0, query_position - case.sliding_window + 1)
            visible = range(first, query_position + 1)
            blocks = [tables[seq][position // case.block_size] for position in visible]
            offsets = [position % case.block_size for position in visible]
            keys = key_cache[blocks, offsets]  # [L, KVH, D]
            values = value_cache[blocks, offsets]
            heads = []
            for head in range(case.num_heads):
                kv_head = head // group_size
                scores = keys[:, kv_head] @ query[head] * scale
                if case.softcap is not None:
                    scores = case.softcap * torch.tanh(scores / case.softcap)
                heads.append(torch.softmax(scores, dim=0) @ values[:, kv_head])
            rows.append(torch.stack(heads))
    return torch.stack(rows)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_per_query_loop(case: Case, seed: int) -> None:
    batch = build_batch(case, torch.device("cpu"), seed)
    backend = ReferenceAttentionBackend()
    backend.write_kv(batch.key_cache, batch.value_cache, batch.key, batch.value, batch.group.slot_mapping,
                     batch.kv_scales)
    expected = loop_attention(batch, case)
    if batch.key_cache.dtype.is_floating_point:
        batch.key_cache[batch.forbidden_blocks] = float("nan")
        batch.value_cache[batch.forbidden_blocks] = float("nan")
    out = backend.forward(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.group,
        scale=case.head_dim**-0.5, sliding_window=case.sliding_window, softcap=case.softcap,
        kv_scales=batch.kv_scales,
    )
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    assert torch.isfinite(out).all(), f"{case.name}: NaN in output (a forbidden block was read)"
    error = ((out.double() - expected).norm() / expected.norm()).item()
    limit = 1e-5 if case.dtype == "float32" else case.max_rel_error
    assert error < limit, f"{case.name}: relative error {error}"
    assert not math.isnan(error)


def test_reference_ignores_query_order_of_rows() -> None:
    """Decode rows after, between and before prefill rows land back at their own token index."""
    case = Case("order", 4, 2, 16, 8, (1, 7, 1, 1, 5), (20, 30, 9, 2, 5))
    batch = build_batch(case, torch.device("cpu"), seed=3)
    backend = ReferenceAttentionBackend()
    backend.write_kv(batch.key_cache, batch.value_cache, batch.key, batch.value, batch.group.slot_mapping)
    out = backend.forward(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.group,
        scale=0.25, sliding_window=None, softcap=None,
    )
    expected = loop_attention(batch, case)  # its scale is head_dim**-0.5 = 0.25
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_fp8_quantize_divides_clamps_and_dequantize_multiplies() -> None:
    scale = torch.tensor(0.5)
    values = torch.tensor([1.0, -3.0, 300.0, -1000.0, 0.0, 1.0 / 1024])
    stored = quantize_kv(values, scale)
    assert stored.dtype == torch.float8_e4m3fn
    # value / scale, clamped to +-448 (e4m3's largest finite value); 2^-10 / 0.5 = 2^-9, the smallest subnormal.
    assert stored.float().tolist() == [2.0, -6.0, 448.0, -448.0, 0.0, 1.0 / 512]
    assert dequantize_kv(stored, scale).tolist() == [1.0, -3.0, 224.0, -224.0, 0.0, 1.0 / 1024]
    # Every finite e4m3 value survives a round trip; a model-dtype cache is read as it is.
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    every = every[every.isfinite()]
    assert torch.equal(dequantize_kv(quantize_kv(every, None), None), every)
    assert torch.equal(dequantize_kv(every, scale), every)


def test_fp8_cache_attends_within_a_few_percent_of_the_float32_cache() -> None:
    """The same batch with a float32 cache and an FP8 one: e4m3 keeps 3 mantissa bits, so with values near 1
    and scales 1.0 the outputs differ by a few percent; values past 448 are clamped (a large error) unless
    the scales bring them into range."""
    case = Case("fp8_vs_fp32", 8, 2, 32, 16, (1, 9, 1, 3), (75, 60, 50, 3), sliding_window=40)
    backend = ReferenceAttentionBackend()
    kwargs = dict(scale=case.head_dim**-0.5, sliding_window=case.sliding_window, softcap=None)

    def attend(batch, magnitude: float, fp8: bool, kv_scales: torch.Tensor | None) -> torch.Tensor:
        key_cache, value_cache = batch.key_cache * magnitude, batch.value_cache * magnitude
        if fp8:
            key_cache = quantize_kv(batch.key_cache * magnitude, None if kv_scales is None else kv_scales[0])
            value_cache = quantize_kv(batch.value_cache * magnitude, None if kv_scales is None else kv_scales[1])
        backend.write_kv(key_cache, value_cache, batch.key * magnitude, batch.value * magnitude,
                         batch.group.slot_mapping, kv_scales)
        return backend.forward(batch.query / magnitude, key_cache, value_cache, batch.metadata, batch.group,
                               kv_scales=kv_scales, **kwargs)

    def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
        return ((out - ref).norm() / ref.norm()).item()

    batch = build_batch(case, torch.device("cpu"), seed=0)
    error = relative_error(attend(batch, 1.0, fp8=True, kv_scales=None), attend(batch, 1.0, fp8=False, kv_scales=None))
    assert 1e-3 < error < 0.05, error  # quantized, and close
    exact = attend(batch, 1000.0, fp8=False, kv_scales=None)
    assert relative_error(attend(batch, 1000.0, fp8=True, kv_scales=None), exact) > 0.3  # clamped at 448
    # Scales as a calibration would set them: each tensor's largest magnitude maps to 448.
    amax = [max(cache.abs().max(), new.abs().max()).item() * 1000.0
            for cache, new in ((batch.key_cache, batch.key), (batch.value_cache, batch.value))]
    assert relative_error(attend(batch, 1000.0, fp8=True, kv_scales=torch.tensor(amax) / 448.0), exact) < 0.05
