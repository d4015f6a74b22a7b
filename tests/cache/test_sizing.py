"""The GPU memory plan's arithmetic: what is set aside before the KV cache gets the rest of the budget."""

from __future__ import annotations

from pagedserve.cache.sizing import GIB, MemoryPlan, kv_budget_bytes


def _kv(**overrides) -> int:
    args = dict(is_gpu=True, device_total_bytes=100 * GIB, device_free_bytes=80 * GIB, max_memory_percent=0.9,
                weights_bytes=16 * GIB, activation_peak_bytes=1 * GIB, max_cpu_kv_bytes=0)
    args.update(overrides)
    return kv_budget_bytes(**args)[1]


def test_decode_graph_reserve_comes_out_of_the_kv_cache() -> None:
    # 90 GiB budget - 16 weights - 1 activations - 4 held by another process = 69; graphs take 2 more.
    assert _kv() == 69 * GIB
    assert _kv(cuda_graph_bytes=2 * GIB) == 67 * GIB
    assert _kv(cuda_graph_bytes=200 * GIB) == 0  # never negative


def test_the_plan_names_the_graph_reserve() -> None:
    plan = MemoryPlan(100 * GIB, 90 * GIB, 16 * GIB, GIB, 67 * GIB, (1000,), 16, cuda_graph_bytes=2 * GIB)
    assert "CUDA graphs 2.000 GiB" in plan.describe()
    assert "CUDA graphs" not in MemoryPlan(100 * GIB, 90 * GIB, 16 * GIB, GIB, 67 * GIB, (1000,), 16).describe()
