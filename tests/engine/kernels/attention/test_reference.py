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

from pagedserve.engine.kernels.attention.reference import ReferenceAttentionBackend


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
    """[T, H, D] float64, one query token and one key position at a time."""
    key_cache, value_cache = batch.key_cache.double(), batch.value_cache.double()
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
    backend.write_kv(batch.key_cache, batch.value_cache, batch.key, batch.value, batch.group.slot_mapping)
    expected = loop_attention(batch, case)
    if batch.key_cache.dtype.is_floating_point:
        batch.key_cache[batch.forbidden_blocks] = float("nan")
        batch.value_cache[batch.forbidden_blocks] = float("nan")
    out = backend.forward(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.group,
        scale=case.head_dim**-0.5, sliding_window=case.sliding_window, softcap=case.softcap,
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
