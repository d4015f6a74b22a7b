"""bench/moe_bench.py on CPU: the bound's arithmetic, and the script end to end on a tiny MoE shape (a GPU
run should not fail on the script itself)."""

from __future__ import annotations

import json

import pytest

from bench_scripts import bench_script


@pytest.fixture(scope="module")
def moe_bench():
    yield from bench_script("moe_bench")


def test_active_weight_bytes_of_the_qwen3_30b_a3b_shape(moe_bench) -> None:
    """About 3 B parameters a token reads (attention, router, 8 of 128 experts per layer, the LM head)."""
    active = moe_bench.active_weight_bytes(moe_bench.SHAPES["qwen3-30b-a3b"])
    assert 5.9e9 < active < 6.3e9
    # FP8 (--quantization fp8): attention and experts at one byte a weight, router and LM head in bf16.
    assert 3.2e9 < moe_bench.active_weight_bytes(moe_bench.SHAPES["qwen3-30b-a3b"], fp8=True) < 3.5e9


def test_tiny_run_end_to_end(moe_bench, tmp_path) -> None:
    out = tmp_path / "moe.json"
    code = moe_bench.main(["--shape", "tiny", "--workloads", "b1,w64", "--requests-scale", "0.05",
                           "--max-new-tokens", "3", "--baseline", "w64", "--tokens", "1", "--out", str(out)])
    assert code == 0
    payload = json.loads(out.read_text())
    engines = {r["engine"] for r in payload["results"]["w64"]}
    assert engines == {"pagedserve moe_backend=fused", "pagedserve moe_backend=transformers"}  # no baseline on CPU
    assert [row["tokens"] for row in payload["microbench"]] == [1]
    fused, unfused = ([r for r in payload["results"]["w64"] if r["engine"].endswith(backend)][0]
                      for backend in ("=fused", "=transformers"))
    assert fused["details"]["tokens"] == unfused["details"]["tokens"]  # same greedy tokens either way (float32)
    assert "| w64 |" in moe_bench.summary_table(payload)


def test_layer_breakdown_of_a_synthetic_kernel_stream(moe_bench) -> None:
    """Two steps of three layers, each layer 8 kernels of 1 us with 0.5 us gaps, the first expert kernel started
    by programmatic dependent launch 0.3 us before the router's end; between steps an LM head, a sampler and a
    10 us host gap. The layer, its experts and what runs outside the layers come out of the stream."""
    if "_gate_up_rows_kernel" not in moe_bench.expert_kernel_names():
        pytest.skip("triton is not installed: no expert kernel names")
    layer = ["norm", "qkv", "attention", "o_proj", "router", "topk", "_gate_up_rows_kernel", "_down_rows_kernel"]
    events, now = [], 0.0
    for step in range(2):
        for _ in range(3):
            for name in layer:
                start = now - 0.8 if name == "_gate_up_rows_kernel" else now  # launched early, waits
                events.append((start, now + 1.0, name))
                now += 1.5
        for name in ("lm_head", "sample"):
            events.append((now, now + 1.0, name))
            now += 1.5
        now += 10.0
    result = moe_bench.layer_breakdown(events, moe_bench.expert_kernel_names())
    assert result["layers_averaged"] == 4 and result["other_segments"] == 1
    assert result["layer_us"] == pytest.approx(12.0)
    assert result["experts_us"] == pytest.approx(3.0)  # from the router's end, not the early start
    assert [k["name"] for k in result["kernels"]] == layer and result["kernels"][-1]["is_expert"]
    assert result["kernels"][0]["gap_before_us"] == pytest.approx(0.5)
    assert result["outside_layers_us"] == pytest.approx(13.0)
    table = moe_bench.kernel_table(events, num_steps=2)
    assert {row["name"]: row["per_step"] for row in table}["norm"] == 3.0
