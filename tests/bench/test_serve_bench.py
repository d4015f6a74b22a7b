"""bench/serve_bench.py's goodput sweep: arrivals, workloads, the SLO verdict and the goodput choice, then one
sweep end to end against a fake OpenAI streaming server (aiohttp, no Ray, no model).

The verdicts below never depend on how fast this machine is: latencies are set by hand, and the end-to-end
sweep's SLOs are loose enough that only the fake server's refusals decide.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import threading

import pytest
from aiohttp import web
from bench_scripts import bench_script



@pytest.fixture(scope="module")
def serve_bench():
    yield from bench_script("serve_bench")


# ---- arrivals ------------------------------------------------------------------------------------------
def test_poisson_arrivals_start_at_zero_stay_inside_the_duration_and_the_cap(serve_bench) -> None:
    arrivals = serve_bench.poisson_arrivals_s(10.0, 5.0, None, seed=1)
    assert arrivals[0] == 0.0
    assert all(a < b for a, b in zip(arrivals, arrivals[1:]))
    assert arrivals[-1] < 5.0
    assert len(serve_bench.poisson_arrivals_s(10.0, 5.0, 7, seed=1)) == 7
    assert serve_bench.poisson_arrivals_s(10.0, 5.0, 7, seed=1) == arrivals[:7]
    assert serve_bench.poisson_arrivals_s(10.0, 5.0, None, seed=2) != arrivals


def test_poisson_arrivals_keep_the_single_run_draws(serve_bench) -> None:
    """--rate's schedule is the one the loop of sleep(expovariate(rate)) on Random(seed + 1) gave before."""
    import random

    rng = random.Random(1)
    expected, at_s = [], 0.0
    for _ in range(64):
        expected.append(at_s)
        at_s += rng.expovariate(4.0)
    assert serve_bench.poisson_arrivals_s(4.0, math.inf, 64, seed=1) == pytest.approx(expected)


def test_poisson_arrivals_have_the_asked_rate(serve_bench) -> None:
    arrivals = serve_bench.poisson_arrivals_s(50.0, 200.0, None, seed=3)
    assert len(arrivals) / 200.0 == pytest.approx(50.0, rel=0.05)  # 10,000 expected; sd 1%
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert statistics.pstdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.05)  # exponential: sd = mean


@pytest.mark.parametrize("rate, duration, cap", [(0.0, 1.0, None), (-1.0, 1.0, None), (1.0, 0.0, None), (1.0, 1.0, 0)])
def test_poisson_arrivals_reject_bad_bounds(serve_bench, rate, duration, cap) -> None:
    with pytest.raises(ValueError):
        serve_bench.poisson_arrivals_s(rate, duration, cap, seed=0)


def test_every_pass_and_the_warmup_get_their_own_seed(serve_bench) -> None:
    seeds = [serve_bench.pass_seed(0, index) for index in range(-1, 8)]
    arrival_seeds = [seed + 1 for seed in seeds]
    assert len(set(seeds) | set(arrival_seeds)) == 2 * len(seeds)


# ---- workloads -----------------------------------------------------------------------------------------
def test_uniform_token_workload_is_common_random_token_workload(serve_bench) -> None:
    from common import random_token_workload

    spec = serve_bench.WorkloadSpec("uniform", max_tokens=128, prompt_lens=(64, 1024), vocab_size=128000)
    workload = spec.build(20, seed=5)
    assert workload.prompts == random_token_workload(20, 64, 1024, 128, vocab_size=128000, seed=5).prompts
    assert workload.max_tokens == [128] * 20
    assert all(64 <= len(prompt) <= 1024 for prompt in workload.prompts)
    assert "uniform in [64, 1024]" in spec.describe()


def test_uniform_word_workload(serve_bench) -> None:
    workload = serve_bench.WorkloadSpec("uniform", max_tokens=16, prompt_words=5).build(3, seed=0)
    assert [len(prompt.split()) for prompt in workload.prompts] == [5, 5, 5]
    assert workload.max_tokens == [16, 16, 16]


def test_sharegpt_workload_has_the_asked_means_and_a_long_tail(serve_bench) -> None:
    spec = serve_bench.WorkloadSpec("sharegpt", max_tokens=1, vocab_size=1000)
    workload = spec.build(4000, seed=11)
    prompt_lens = [len(prompt) for prompt in workload.prompts]
    assert statistics.mean(prompt_lens) == pytest.approx(200, rel=0.08)
    assert statistics.mean(workload.max_tokens) == pytest.approx(180, rel=0.08)
    # Lognormal: the median sits at mean * exp(-sigma^2 / 2), well below the mean (121 and 130 here).
    assert statistics.median(prompt_lens) == pytest.approx(200 * math.exp(-0.5), rel=0.1)
    assert statistics.median(workload.max_tokens) == pytest.approx(180 * math.exp(-0.32), rel=0.1)
    assert min(prompt_lens) >= 4 and max(prompt_lens) <= 2048 and max(prompt_lens) > 1000
    assert min(workload.max_tokens) >= 4 and max(workload.max_tokens) <= 2048
    assert all(0 <= token < 1000 for prompt in workload.prompts[:50] for token in prompt)
    assert spec.build(4000, seed=11) == workload
    assert spec.build(50, seed=12).prompts != workload.prompts[:50]


def test_sharegpt_workload_fits_a_small_context(serve_bench) -> None:
    spec = serve_bench.WorkloadSpec("sharegpt", max_tokens=1, vocab_size=3000)
    workload = spec.build(500, seed=0, max_model_len=256)
    totals = [len(prompt) + max_tokens for prompt, max_tokens in zip(workload.prompts, workload.max_tokens)]
    assert max(totals) <= 256
    assert min(len(prompt) for prompt in workload.prompts) >= 4 and min(workload.max_tokens) >= 4
    assert "prompt + output <= 256" in workload.description


def test_lognormal_lengths_reject_bad_parameters() -> None:
    from common import LognormalLengths, lognormal_token_workload

    for mean, sigma, low, high in [(0, 1.0, 4, 10), (10, -1.0, 4, 10), (10, 1.0, 0, 10), (10, 1.0, 11, 10)]:
        with pytest.raises(ValueError):
            LognormalLengths(mean, sigma, low, high)
    lengths = LognormalLengths(10, 1.0, 4, 10)
    with pytest.raises(ValueError, match="max_total_len=7"):
        lognormal_token_workload(1, lengths, lengths, vocab_size=10, seed=0, max_total_len=7)
    assert LognormalLengths(10, 0.0, 1, 100).mu == pytest.approx(math.log(10))


def test_unknown_workload_is_refused(serve_bench) -> None:
    with pytest.raises(ValueError, match="workload must be one of"):
        serve_bench.WorkloadSpec("chat", max_tokens=1)


# ---- one pass, the SLO verdict and the goodput ----------------------------------------------------------
def ok_result(serve_bench, ttft_s: float, e2e_s: float, itl_s: list[float], num_tokens: int):
    """A streamed result: a chunk for the first token and one after each gap."""
    return serve_bench.RequestResult(ok=True, num_output_tokens=num_tokens, ttft_s=ttft_s, e2e_s=e2e_s, itl_s=itl_s,
                                     num_chunks=len(itl_s) + 1)


def ok_results(serve_bench, ttft_s: float, tpot_s: float, itl_s: float, count: int = 100, num_tokens: int = 11):
    """`count` successful results; TPOT (end - first token) / (tokens - 1) comes out as `tpot_s`."""
    e2e_s = ttft_s + tpot_s * (num_tokens - 1)
    return [ok_result(serve_bench, ttft_s, e2e_s, [itl_s] * (num_tokens - 1), num_tokens) for _ in range(count)]


def workload_of(serve_bench, count: int):
    return serve_bench.ServeWorkload([[1, 2, 3]] * count, [11] * count, "test")


def test_summarize_pass_p99_counts_and_errors(serve_bench) -> None:
    results = ok_results(serve_bench, 0.1, 0.02, 0.02, count=99)
    results.append(ok_result(serve_bench, 0.1 + 2.0, 2.1 + 0.02 * 10, [0.02] * 9 + [0.5], 11))  # one slow start
    results += [serve_bench.RequestResult(ok=False, error="HTTP 503") for _ in range(2)]
    result = serve_bench.summarize_pass(10.0, workload_of(serve_bench, 102), results, wall_s=10.0)
    assert (result.num_sent, result.num_ok, result.errors) == (102, 100, {"HTTP 503": 2})
    assert result.num_prompt_tokens == 3 * 102
    assert result.num_output_tokens == 1100
    assert result.achieved_per_s == pytest.approx(10.0)
    assert result.ttft_s["p50"] == pytest.approx(0.1)
    # 100 TTFTs, one of 2.1 s: numpy's p99 sits at rank 98.01 of 0..99, a hundredth of the way to the slow one.
    assert result.ttft_s["p99"] == pytest.approx(0.1 + 0.01 * 2.0)
    assert result.tpot_s["p99"] == pytest.approx(0.02)
    assert result.itl_s["p99"] == pytest.approx(0.02)  # one gap of 500 ms among 1000 stays below p99


def test_slo_holds_at_the_threshold_and_fails_past_it_or_on_an_error(serve_bench) -> None:
    slo = serve_bench.Slo(ttft_p99_s=1.0, tpot_p99_s=0.05, itl_p99_s=0.1)
    at_limit = serve_bench.summarize_pass(1.0, workload_of(serve_bench, 100), ok_results(serve_bench, 1.0, 0.05, 0.1),
                                          wall_s=1.0)
    assert slo.checks(at_limit) == {"TTFT": True, "TPOT": True, "ITL": True} and at_limit.meets(slo)
    for ttft_s, tpot_s, itl_s, failing in [(1.01, 0.05, 0.1, "TTFT"), (1.0, 0.051, 0.1, "TPOT"),
                                           (1.0, 0.05, 0.11, "ITL")]:
        results = ok_results(serve_bench, ttft_s, tpot_s, itl_s)
        result = serve_bench.summarize_pass(1.0, workload_of(serve_bench, 100), results, wall_s=1.0)
        assert [name for name, holds in slo.checks(result).items() if not holds] == [failing]
        assert not result.meets(slo)
    with_error = ok_results(serve_bench, 0.1, 0.01, 0.01) + [serve_bench.RequestResult(ok=False, error="TimeoutError")]
    result = serve_bench.summarize_pass(1.0, workload_of(serve_bench, 101), with_error, wall_s=1.0)
    assert all(slo.checks(result).values()) and not result.meets(slo)
    # Nothing measured (one-token outputs: no TPOT, no ITL) is no evidence that the SLO holds.
    single = [ok_result(serve_bench, 0.1, 0.1, [], 1) for _ in range(10)]
    result = serve_bench.summarize_pass(1.0, workload_of(serve_bench, 10), single, wall_s=1.0)
    assert slo.checks(result) == {"TTFT": True, "TPOT": False, "ITL": False}


@pytest.mark.parametrize("verdicts, rate, lower_bound, missed, line", [
    ([(10, True), (20, True), (30, False)], 20, False, (), "goodput: 20 req/s"),
    ([(10, True), (20, True)], 20, True, (), "goodput: at least 20 req/s"),  # out of rates or of time
    ([(10, False), (20, False)], None, False, (), "goodput: none (no rate met every SLO, 10 req/s"),
    ([(10, True), (20, False), (30, True), (40, False)], 30, False, (20,), "goodput: 30 req/s"),
    ([], None, False, (), "goodput: unknown"),
])
def test_goodput_is_the_highest_rate_that_met_every_slo(serve_bench, verdicts, rate, lower_bound, missed,
                                                        line) -> None:
    goodput = serve_bench.choose_goodput(verdicts)
    assert (goodput.rate_per_s, goodput.is_lower_bound, goodput.missed_below) == (rate, lower_bound, missed)
    assert goodput.describe().startswith(line)
    if missed:
        assert "slower rates that missed: 20 req/s" in goodput.describe()


def test_sweep_table_has_a_row_per_pass_and_the_verdicts(serve_bench) -> None:
    slo = serve_bench.Slo()
    workload = workload_of(serve_bench, 100)
    fast = serve_bench.summarize_pass(10, workload, ok_results(serve_bench, 0.1, 0.01, 0.01), wall_s=10.0)
    slow = serve_bench.summarize_pass(20, workload, ok_results(serve_bench, 0.1, 0.09, 0.2), wall_s=5.0)
    lines = serve_bench.sweep_table([fast, slow], slo).splitlines()
    assert len(lines) == 4
    assert "TTFT p99 <= 1000" in lines[0] and "TPOT p99 <= 50" in lines[0] and "ITL p99 <= 100" in lines[0]
    assert lines[2].startswith("| 10 | 100 / 100 | 10.00 |") and lines[2].endswith("| yes | yes | yes | **yes** |")
    assert "| 90.0 / 90.0 |" in lines[3] and lines[3].endswith("| yes | no | no | no |")
    assert "| tokens / chunk |" in lines[0] and "| 10.0 / 10.0 | 1.00 | none |" in lines[2]


def test_tokens_per_chunk_counts_merged_deltas_and_only_streamed_requests(serve_bench) -> None:
    """11 tokens in 11 chunks and 11 in 4 (deltas merged): 22 / 15; one-response results (no chunks) and failures
    do not count; with no streamed result there is nothing to say."""
    results = [ok_result(serve_bench, 0.1, 0.3, [0.02] * 10, 11), ok_result(serve_bench, 0.1, 0.3, [0.06] * 3, 11),
               serve_bench.RequestResult(ok=True, num_output_tokens=50, e2e_s=1.0)]
    assert serve_bench.tokens_per_chunk(results) == pytest.approx(22 / 15)
    result = serve_bench.summarize_pass(1.0, workload_of(serve_bench, 4), results + [
        serve_bench.RequestResult(ok=False, error="HTTP 503")], wall_s=1.0)
    assert result.tokens_per_chunk == pytest.approx(22 / 15)
    assert serve_bench.tokens_per_chunk(results[2:]) is None


# ---- flags ---------------------------------------------------------------------------------------------
def test_single_run_defaults_are_unchanged(serve_bench) -> None:
    args = serve_bench.parse_args([])
    assert (args.num_requests, args.duration_s, args.concurrency, args.rate) == (64, 300.0, 8, None)
    args = serve_bench.parse_args(["--rate", "4"])
    assert (args.num_requests, args.concurrency) == (64, None)


def test_sweep_flags(serve_bench) -> None:
    args = serve_bench.parse_args(["--sweep-rates", "30", "10", "20", "10"])
    assert args.sweep_rates == [10, 20, 30] and args.duration_s == 30.0 and args.num_requests is None
    assert (args.slo_ttft_p99_s, args.slo_tpot_p99_ms, args.slo_itl_p99_ms) == (1.0, 50.0, 100.0)
    for argv in (["--json-out", "x.json"], ["--sweep-rates", "1", "--offline"], ["--sweep-rates", "0"],
                 ["--sweep-rates", "1", "--rate", "2"], ["--workload", "sharegpt", "--offline"]):
        with pytest.raises(SystemExit):
            serve_bench.parse_args(argv)


# ---- a sweep against a fake service ---------------------------------------------------------------------
class FakeService:
    """OpenAI-shaped streaming completions in a thread of their own; answers 503 once `capacity` requests
    have been served, so a sweep's later passes fail however fast this machine is."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.num_served = 0
        self.max_tokens_seen: list[int] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fake", "max_model_len": 256}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.num_served >= self.capacity:
            return web.json_response({"error": {"type": "overloaded"}}, status=503)
        self.num_served += 1
        self.max_tokens_seen.append(body["max_tokens"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(body["max_tokens"]):
            await response.write(b"data: " + json.dumps({"choices": [{"text": "x"}]}).encode() + b"\n\n")
        usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
        await response.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> str:
        self.thread.start()
        assert self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_sweep_stops_after_the_first_miss_and_reports_the_goodput(serve_bench, tmp_path, capsys) -> None:
    out = tmp_path / "sweep.json"
    seed = 0
    # Passes of 0.5 s at 20, 40 and 80 req/s: the first two fit under the fake's capacity, the third cannot.
    first_two = sum(len(serve_bench.poisson_arrivals_s(rate, 0.5, None, serve_bench.pass_seed(seed, index) + 1))
                    for index, rate in enumerate([20, 40]))
    with FakeService(capacity=4 + first_two) as url:  # 4 for the warm-up
        args = serve_bench.parse_args([
            "--url", url, "--sweep-rates", "20", "40", "80", "160", "--duration-s", "0.5", "--sweep-gap-s", "0",
            "--workload", "sharegpt", "--sharegpt-means", "20", "10", "--vocab-size", "100",
            "--warmup-requests", "4", "--stop-after-miss", "1", "--json-out", str(out),
            # Loose latency SLOs: only the refusals decide, however slow this machine is.
            "--slo-ttft-p99-s", "60", "--slo-tpot-p99-ms", "60000", "--slo-itl-p99-ms", "60000",
        ])
        serve_bench.run_sweep(args)
    printed = capsys.readouterr().out
    assert "goodput: 40 req/s" in printed
    assert "not run: 160 req/s (1 missed passes in a row)" in printed
    report = json.loads(out.read_text())
    assert [(p["rate_per_s"], p["slo_met"]) for p in report["passes"]] == [(20, True), (40, True), (80, False)]
    assert report["passes"][2]["errors"]["HTTP 503"] > 0
    assert report["rates_not_run"] == [160] and report["goodput"]["rate_per_s"] == 40
    assert report["max_model_len"] == 256 and report["goodput_line"] == "goodput: 40 req/s"


def test_sweep_budget_leaves_out_passes_that_would_end_past_it(serve_bench, capsys) -> None:
    # The second pass alone sends for almost 0.5 s after the first one's 0.5 s: past a budget of 0.7 s.
    with FakeService(capacity=1000) as url:
        args = serve_bench.parse_args([
            "--url", url, "--sweep-rates", "20", "40", "--duration-s", "0.5", "--sweep-gap-s", "0",
            "--prompt-lens", "4", "8", "--vocab-size", "100", "--max-tokens", "3", "--sweep-budget-s", "0.7",
            "--slo-ttft-p99-s", "60", "--slo-tpot-p99-ms", "60000", "--slo-itl-p99-ms", "60000",
        ])
        serve_bench.run_sweep(args)
    printed = capsys.readouterr().out
    assert "pass 1/2: 20 req/s" in printed and "pass 2/2" not in printed
    assert "not run: 40 req/s (the pass at 40 req/s would end about" in printed
    assert "goodput: at least 20 req/s" in printed
