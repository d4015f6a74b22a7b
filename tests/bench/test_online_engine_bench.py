"""bench/online_engine_bench.py: its arrivals, the SLO verdict of a row, and one pass through a tiny engine,
drain cap included. Verdicts never depend on this machine's speed: latencies are set by hand."""

from __future__ import annotations

import asyncio

import pytest
from bench_scripts import bench_script

TOKENS = 5


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("online_engine_bench")


def test_poisson_arrivals_start_at_zero_stay_inside_the_duration_at_about_the_rate(bench) -> None:
    arrivals = bench.poisson_arrivals_s(50.0, 100.0, None, seed=3)
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and arrivals[-1] < 100.0
    assert 4500 < len(arrivals) < 5500
    assert bench.poisson_arrivals_s(50.0, 100.0, None, seed=3) == arrivals  # the same for every bound


def test_bounds_parse_none_and_positive_integers(bench) -> None:
    assert [bench.parse_bound(text) for text in ("none", "None", "512")] == [None, None, 512]
    with pytest.raises(Exception, match="'none' or an integer >= 1"):
        bench.parse_bound("0")


def test_rules_parse_constant_bounds_and_ratios_with_their_options(bench) -> None:
    assert bench.parse_rule("2048") == bench.PrefillRule(2048)
    assert bench.parse_rule("ratio:2") == bench.PrefillRule(bench.RATIO_RULE_BOUND, 2.0)
    rule = bench.parse_rule("ratio:2.5,bound=none,ttft=0.25")
    assert rule == bench.PrefillRule(None, 2.5, 0.25) and rule.label == "ratio:2.5,bound=none,ttft=0.25"
    assert bench.parse_rule("ratio:3").scheduler_changes() == {
        "max_prefill_tokens_while_decoding": 2048, "prefill_step_time_ratio": 3.0, "ttft_target_s": 0.5}
    assert bench.parse_rule("none").scheduler_changes()["prefill_step_time_ratio"] is None  # a pass turns it off
    for text in ("ratio:0.5", "ratio:x", "ratio:2,speed=3", "ratio:2,ttft=0"):
        with pytest.raises(Exception, match="ratio"):
            bench.parse_rule(text)


def latency(p50_ms: float, p99_ms: float) -> dict[str, float]:
    return {"p50": p50_ms / 1000, "p90": p99_ms / 1000, "p99": p99_ms / 1000}


def result(bench, slo, num_finished: int = 10, tpot_p99_ms: float = 40.0):
    row = bench.PassResult(rate_per_s=20, prefill_bound=512, num_sent=10, num_finished=num_finished, wall_s=2.0,
                           num_output_tokens=1280, ttft_s=latency(100, 900), tpot_s=latency(20, tpot_p99_ms),
                           itl_s=latency(20, 90), max_send_lag_s=0.001)
    row.checks = slo.checks(row)
    return row


def test_a_row_meets_the_slo_only_with_every_request_finished_and_every_p99_held(bench) -> None:
    slo = bench.Slo(ttft_p99_s=1.0, tpot_p99_s=0.050, itl_p99_s=0.100)
    rows = [result(bench, slo), result(bench, slo, tpot_p99_ms=51.0), result(bench, slo, num_finished=9)]
    assert [row.meets_slo for row in rows] == [True, False, False]
    lines = bench.table(rows, slo).splitlines()
    assert lines[0].endswith("| SLO (TTFT 1000 / TPOT 50 / ITL 100 ms) |")
    assert lines[2].endswith("| yes |") and lines[3].endswith("| no (TPOT) |")
    assert lines[4].endswith("| no (unfinished) |") and "| 9/10 |" in lines[4]
    assert "| 20 | 512 | 10/10 | 640 | 100.0 / 900.0 | 20.0 / 40.0 | 20.0 / 90.0 | n/a / n/a | n/a / n/a |" in lines[2]


def test_one_pass_times_every_delta_and_aborts_what_outlasts_the_drain(bench, tiny_model_dir) -> None:
    from pagedserve.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_kwargs(model=str(tiny_model_dir("llama")), dtype="float32", block_size=8,
                                        num_blocks=64, engine_process=False)
    prompts = [list(range(20, 40)), list(range(50, 90))]
    try:
        timings, gaps_s, num_sent, _, wall_s = asyncio.run(bench.one_pass(engine, prompts, [0.0, 0.01], TOKENS,
                                                                          30.0, "ok"))
        assert num_sent == 2 and sorted(t.num_output_tokens for t in timings) == [TOKENS, TOKENS]
        # One gap between consecutive deltas; a consumer that fell behind gets tokens merged, so fewer.
        assert len(gaps_s) <= 2 * (TOKENS - 1) and all(gap >= 0 for gap in gaps_s) and wall_s > 0
        assert all(t.ttft_s >= 0 and t.tpot_s is not None for t in timings)
        # Outputs far longer than the drain allows: both streams are cancelled, their requests aborted.
        timings, gaps_s, num_sent, _, _ = asyncio.run(bench.one_pass(engine, prompts, [0.0, 0.01], 400, 0.3, "cut"))
        assert num_sent == 2 and timings == [] and gaps_s == []
        for _ in range(100):
            stats = engine.get_stats()
            if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.shutdown()
