"""The GPU memory plan's arithmetic: what is set aside before the KV cache gets the rest of the budget."""

from __future__ import annotations

from pagedserve.cache.sizing import GIB, GroupShape, MemoryPlan, kv_budget_bytes, plan_num_blocks


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


def test_an_fp8_cache_holds_twice_the_blocks_of_bf16_in_the_same_bytes() -> None:
    groups = [GroupShape(num_layers=32, num_kv_heads=8, head_dim=128, sliding_window=None)]
    args = dict(max_num_seqs=1024, max_model_len=8192, max_batch_tokens=8192)
    bf16 = plan_num_blocks(60 * GIB, groups, 16, 2, **args)
    fp8 = plan_num_blocks(60 * GIB, groups, 16, 1, **args)
    assert bf16 == (30720,) and fp8 == (61440,)  # 2 MiB and 1 MiB a block on the Llama-3-8B shape


def test_the_plan_names_the_cache_dtype() -> None:
    plan = MemoryPlan(100 * GIB, 90 * GIB, 16 * GIB, GIB, 67 * GIB, (1000,), 16, kv_cache_dtype="fp8_e4m3")
    assert "KV cache (fp8_e4m3) 67.000 GiB" in plan.describe()
