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
