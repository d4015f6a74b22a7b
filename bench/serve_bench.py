"""HTTP load generator for a running pagedserve service, compared with the offline engine in the same run.

    python bench/serve_bench.py --url http://127.0.0.1:8000 --num-requests 64 --rate 4
    python bench/serve_bench.py --concurrency 16 --max-tokens 64 --offline --offline-arg num_blocks=512
    python bench/serve_bench.py --sweep-rates 10 20 30 --duration-s 20 --prompt-lens 64 1024 --max-tokens 128
    python bench/serve_bench.py --sweep-rates 20 40 60 --duration-s 15 --workload sharegpt

Arrivals are Poisson at `--rate` requests/s, or a fixed number in flight with `--concurrency`; the run
stops after `--num-requests` or `--duration-s`, whichever comes first. Every request streams
`/v1/completions` (ignore_eos, so output lengths are fixed) and the client times each chunk:

- TTFT: request sent -> first token; TPOT: (end - first token) / (output tokens - 1);
  ITL: gaps between consecutive chunks; E2E: request sent -> last byte.

Workloads (`--workload`):

- uniform (the default): every request asks for `--max-tokens`; prompts are `--prompt-words` words, or with
  `--prompt-lens MIN MAX` random token ids of lengths uniform in [MIN, MAX] (common.random_token_workload).
- sharegpt: random token ids with ShareGPT-like lengths (common.lognormal_token_workload): prompt lengths
  lognormal with mean 200 and sigma 1.0 (median 121, a long tail of pasted documents), output lengths
  lognormal with mean 180 and sigma 0.8 (median 130), each clipped to [4, 2048] and to the served model's
  max_model_len (read from /v1/models); `--sharegpt-means IN OUT` moves the means, for a small-context
  model. The sigmas are chosen to give ShareGPT's long-tailed shape at the issue's means, not fitted to
  the dataset, which this repository does not hold.

Goodput (`--sweep-rates R1 R2 ...`): one Poisson pass per rate against the same service, in increasing
order; a pass sends for `--duration-s` (default 30 in a sweep) or `--num-requests`, whichever ends first,
waits for every response, then idles `--sweep-gap-s` so one pass's tail is not the next one's load. Each
pass has prompts of its own (seed + 1000 * (pass + 1)), so a prefix cache cannot serve one pass from
another; `--warmup-requests N` sends N requests at once first, unmeasured. A pass meets the SLOs when
every request succeeded and TTFT p99 <= `--slo-ttft-p99-s`, TPOT p99 <= `--slo-tpot-p99-ms` and ITL p99
<= `--slo-itl-p99-ms` (percentiles interpolated as numpy's, common.percentile). The goodput is the
highest rate whose pass met them; "at least" when the fastest pass run did. Achieved req/s and
output tok/s are over the pass's wall time, first request sent to last response. `--stop-after-miss N`
ends the sweep after N missed passes in a row and `--sweep-budget-s` before a pass that would not end
inside it; `--json-out` writes the rows. With `--metrics-url` (a Ray metrics agent's endpoint, one per node),
each pass also says where tokens waited inside the service: the stream channel's transit and the ingress's and
engine replica's event loop lag, p50 / p99 over the pass (bench/service_delays.py).

With `--offline`, the same prompts and sampling run through `pagedserve.engine.llm.LLM` in this
process after the HTTP run, and the table shows the service/offline output-token throughput ratio.

With `--start-service` (what `make bench` uses) the script starts the service itself: a local Ray
(8 logical CPUs), one replica of `--service-model` (default: the demo model) with the `--offline-arg`
engine settings, HTTP on a free port of 127.0.0.1; it stops Ray when the run ends, however it ends.
Prints a markdown table for docs/benchmarks.md. No assertion is made on any number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/serve_bench.py` finds bench/common.py

from common import (  # noqa: E402
    LognormalLengths,
    Slo,
    git_commit,
    lognormal_token_workload,
    meets_slo,
    percentile,
    poisson_arrivals_s,
    random_token_workload,
    write_json,
)
import service_delays  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent.parent
WORDS = (
    "the model reads a prompt and writes tokens one at a time while the scheduler keeps every sequence "
    "in paged blocks of the cache so that many requests share one batch and none waits for the longest"
).split()
WORKLOADS = ("uniform", "sharegpt")
# ShareGPT-like lengths (see the module docstring): means from the issue, sigmas for the dataset's long tail.
SHAREGPT_PROMPT_LENS = LognormalLengths(mean=200, sigma=1.0, min_len=4, max_len=2048)
SHAREGPT_OUTPUT_LENS = LognormalLengths(mean=180, sigma=0.8, min_len=4, max_len=2048)


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    num_output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    num_chunks: int = 0  # streamed chunks that carried text: more than one token each where deltas were merged

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


# ---- workloads ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeWorkload:
    """What one run or pass sends: prompts[i] (text or token ids) asking for exactly max_tokens[i] tokens."""

    prompts: list[str] | list[list[int]]
    max_tokens: list[int]
    description: str

    @property
    def num_requests(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class WorkloadSpec:
    """The flags that shape prompts and output lengths; `build` draws a workload of any size from them."""

    kind: str
    max_tokens: int
    prompt_words: int = 32
    prompt_lens: tuple[int, int] | None = None
    vocab_size: int = 128000
    sharegpt_prompt_lens: LognormalLengths = SHAREGPT_PROMPT_LENS
    sharegpt_output_lens: LognormalLengths = SHAREGPT_OUTPUT_LENS

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.kind!r}")

    def build(self, num_requests: int, seed: int, max_model_len: int | None = None) -> ServeWorkload:
        """`max_model_len` clips the sharegpt lengths so that every request fits the served model."""
        if self.kind == "sharegpt":
            drawn = lognormal_token_workload(num_requests, self.sharegpt_prompt_lens, self.sharegpt_output_lens,
                                             vocab_size=self.vocab_size, seed=seed, max_total_len=max_model_len)
            return ServeWorkload(drawn.prompts, drawn.output_lens, drawn.description)
        if self.prompt_lens:
            uniform = random_token_workload(num_requests, self.prompt_lens[0], self.prompt_lens[1], self.max_tokens,
                                            vocab_size=self.vocab_size, seed=seed)
            return ServeWorkload(uniform.prompts, [self.max_tokens] * num_requests, uniform.description)
        return ServeWorkload(make_prompts(num_requests, self.prompt_words, seed), [self.max_tokens] * num_requests,
                             f"{self.prompt_words}-word prompts, {self.max_tokens} output tokens")

    def describe(self, max_model_len: int | None = None) -> str:
        if self.kind == "sharegpt":
            fit = "" if max_model_len is None else f" and prompt + output <= {max_model_len}"
            return (f"sharegpt: random token ids, prompt length {self.sharegpt_prompt_lens.describe()}, output "
                    f"length {self.sharegpt_output_lens.describe()}{fit}, EOS ignored")
        if self.prompt_lens:
            return (f"uniform: random token ids, prompt length uniform in [{self.prompt_lens[0]}, "
                    f"{self.prompt_lens[1]}], {self.max_tokens} output tokens (EOS ignored)")
        return f"uniform: {self.prompt_words}-word prompts, {self.max_tokens} output tokens (EOS ignored)"


def make_prompts(num: int, prompt_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(num)]


def pass_seed(seed: int, pass_index: int) -> int:
    """Prompt seed of a sweep pass (its arrivals use this + 1); pass -1 is the warm-up."""
    return seed + 1000 * (pass_index + 1)


# ---- one request ---------------------------------------------------------------------------------
async def one_request(
    session: aiohttp.ClientSession, model: str, prompt: str | list[int], max_tokens: int, temperature: float,
    stream: bool = True,
) -> RequestResult:
    body: dict[str, Any] = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    started = time.perf_counter()
    result = RequestResult(ok=False)
    last_chunk_s: float | None = None
    try:
        async with session.post("/v1/completions", json=body) as response:
            if response.status != 200:
                await response.read()
                result.error = f"HTTP {response.status}"
                return result
            if not stream:  # one response per request: throughput and E2E only
                result.num_output_tokens = (await response.json())["usage"]["completion_tokens"]
                result.e2e_s = time.perf_counter() - started
                result.ok = True
                return result
            async for raw in response.content:  # one line at a time
                if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                    continue
                payload = json.loads(raw[len(b"data: "):])
                if "error" in payload:
                    result.error = payload["error"].get("type", "error")
                    return result
                now = time.perf_counter()
                if payload.get("usage"):
                    result.num_output_tokens = payload["usage"]["completion_tokens"]
                if payload.get("choices") and payload["choices"][0].get("text"):
                    result.num_chunks += 1
                    if result.ttft_s is None:
                        result.ttft_s = now - started
                    elif last_chunk_s is not None:
                        result.itl_s.append(now - last_chunk_s)
                    last_chunk_s = now
        result.e2e_s = time.perf_counter() - started
        result.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.error = type(exc).__name__
    return result


def request_model(args: argparse.Namespace, model: str, index: int) -> str:
    """The model request `index` names: with `--lora-models`, adapter index mod N (requests split evenly over
    LoRA adapters the service serves); else the served model."""
    names = getattr(args, "lora_models", None)
    return names[index % len(names)] if names else model


def client_session(args: argparse.Namespace) -> aiohttp.ClientSession:
    """A session on `args.url`; call it inside the event loop that uses it."""
    # aiohttp, not httpx: at 512 requests in flight httpx's connection pool cost the client 3.9 s of CPU
    # for 512 one-response requests that aiohttp sends in 0.16 s on a local server, so the
    # load generator, not the service, set the pace.
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: --concurrency is the cap
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)
    return aiohttp.ClientSession(args.url, connector=connector, timeout=timeout, headers=headers)


async def send_on_schedule(
    session: aiohttp.ClientSession, args: argparse.Namespace, model: str, workload: ServeWorkload,
    arrivals_s: Sequence[float],
) -> tuple[list[RequestResult], float, float]:
    """Request i sent at arrivals_s[i] after the start (open loop: a late client catches up at once).

    Returns the results in send order, the wall time from the start to the last response, and how late
    the latest send was against its schedule (the client's own lag).
    """
    started = time.perf_counter()
    tasks: list[asyncio.Task] = []
    max_lag_s = 0.0
    for index, (prompt, max_tokens, at_s) in enumerate(zip(workload.prompts, workload.max_tokens, arrivals_s)):
        delay_s = started + at_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        max_lag_s = max(max_lag_s, time.perf_counter() - started - at_s)
        tasks.append(asyncio.create_task(one_request(session, request_model(args, model, index), prompt, max_tokens,
                                                     args.temperature, stream=not args.no_stream)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - started, max_lag_s


async def run_load(args: argparse.Namespace, model: str, workload: ServeWorkload) -> tuple[list[RequestResult], float]:
    async with client_session(args) as session:
        if not args.concurrency:
            arrivals_s = poisson_arrivals_s(args.rate, args.duration_s, workload.num_requests, args.seed + 1)
            results, elapsed, _ = await send_on_schedule(session, args, model, workload, arrivals_s)
            return results, elapsed
        results: list[RequestResult] = []
        started = time.perf_counter()
        deadline = started + args.duration_s
        queue = list(enumerate(zip(workload.prompts, workload.max_tokens)))

        async def worker() -> None:
            while queue and time.perf_counter() < deadline:
                index, (prompt, max_tokens) = queue.pop(0)
                results.append(await one_request(session, request_model(args, model, index), prompt, max_tokens,
                                                 args.temperature, stream=not args.no_stream))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return results, time.perf_counter() - started


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    return " / ".join(f"{percentile(values, q) * 1000:.1f}" for q in (50, 90, 99))


# ---- goodput sweep -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PassResult:
    """One Poisson pass of a sweep, latencies as {"p50": s, "p99": s} (None where nothing was measured)."""

    rate_per_s: float
    num_sent: int
    num_ok: int
    errors: dict[str, int]
    wall_s: float  # first request sent -> last response
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: dict[str, float] | None
    tpot_s: dict[str, float] | None
    itl_s: dict[str, float] | None
    max_send_lag_s: float = 0.0
    client_cpu_s: float = 0.0  # this process's CPU time over the pass: near wall_s, the client set the pace
    # Output tokens per text chunk of the streamed requests (None: nothing streamed). 1.0: every engine step's
    # token went out as its own event; more: the service merged deltas (event pacing, or a reader behind), and
    # each merge shows as one longer ITL gap.
    tokens_per_chunk: float | None = None
    # Where tokens waited inside the service over the pass (bench/service_delays.py; None: no --metrics-url).
    service_delays: dict[str, dict[str, Any]] | None = None

    @property
    def achieved_per_s(self) -> float:
        return self.num_ok / self.wall_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s

    def meets(self, slo: Slo) -> bool:
        """Every request succeeded and every p99 holds."""
        return meets_slo(self.num_sent, self.num_ok, slo.checks(self))

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["achieved_per_s"] = self.achieved_per_s
        payload["output_tokens_per_s"] = self.output_tokens_per_s
        return payload


def p50_p99(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def summarize_pass(
    rate_per_s: float, workload: ServeWorkload, results: Sequence[RequestResult], wall_s: float,
    max_send_lag_s: float = 0.0, client_cpu_s: float = 0.0,
) -> PassResult:
    """`results[i]` answers `workload`'s request i."""
    errors: dict[str, int] = {}
    for result in results:
        if not result.ok:
            errors[result.error] = errors.get(result.error, 0) + 1
    ok = [r for r in results if r.ok]
    return PassResult(
        rate_per_s=rate_per_s, num_sent=len(results), num_ok=len(ok), errors=errors, wall_s=wall_s,
        num_prompt_tokens=sum(len(prompt) for prompt in workload.prompts[:len(results)]),
        num_output_tokens=sum(r.num_output_tokens for r in ok),
        ttft_s=p50_p99([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=p50_p99([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl_s=p50_p99([gap for r in ok for gap in r.itl_s]),
        max_send_lag_s=max_send_lag_s, client_cpu_s=client_cpu_s, tokens_per_chunk=tokens_per_chunk(ok),
    )


def tokens_per_chunk(results: Sequence[RequestResult]) -> float | None:
    """Output tokens over text chunks, over the requests that were streamed (None when none was)."""
    streamed = [r for r in results if r.num_chunks]
    return sum(r.num_output_tokens for r in streamed) / sum(r.num_chunks for r in streamed) if streamed else None


@dataclass(frozen=True)
class Goodput:
    """The highest swept rate that met every SLO (None: none did)."""

    rate_per_s: float | None
    is_lower_bound: bool  # the fastest pass run met them: the service may take more
    lowest_rate_run: float | None
    missed_below: tuple[float, ...] = ()  # slower rates that missed: noise, or a service that is not monotonic

    def describe(self) -> str:
        if self.rate_per_s is None:
            if self.lowest_rate_run is None:
                return "goodput: unknown (no pass ran)"
            return f"goodput: none (no rate met every SLO, {self.lowest_rate_run:g} req/s the lowest run)"
        line = (f"goodput: at least {self.rate_per_s:g} req/s (the fastest pass run met every SLO)"
                if self.is_lower_bound else f"goodput: {self.rate_per_s:g} req/s")
        if self.missed_below:
            line += f"; slower rates that missed: {', '.join(f'{rate:g}' for rate in self.missed_below)} req/s"
        return line


def choose_goodput(verdicts: Sequence[tuple[float, bool]]) -> Goodput:
    """`verdicts`: (rate, met every SLO) per pass run. A sweep that ran out of rates or time on a pass that met
    the SLOs gives a lower bound; one that ended on a miss gives the goodput itself."""
    met = [rate for rate, is_met in verdicts if is_met]
    lowest = min((rate for rate, _ in verdicts), default=None)
    if not met:
        return Goodput(None, False, lowest)
    best = max(met)
    missed_below = tuple(sorted(rate for rate, is_met in verdicts if not is_met and rate < best))
    return Goodput(best, best == max(rate for rate, _ in verdicts), lowest, missed_below)


def _ms_pair(measured: dict[str, float] | None) -> str:
    return "n/a" if measured is None else f"{measured['p50'] * 1000:.1f} / {measured['p99'] * 1000:.1f}"


def _errors_cell(errors: dict[str, int]) -> str:
    return ", ".join(f"{name}: {count}" for name, count in sorted(errors.items())) or "none"


def sweep_table(results: Sequence[PassResult], slo: Slo) -> str:
    """Markdown: one row per pass, the three p99 checks and the verdict last."""
    header = ["rate req/s", "ok / sent", "achieved req/s", "output tok/s", "TTFT p50 / p99 (ms)",
              "TPOT p50 / p99 (ms)", "ITL p50 / p99 (ms)", "tokens / chunk", "errors",
              f"TTFT p99 <= {slo.ttft_p99_s * 1000:g} ms",
              f"TPOT p99 <= {slo.tpot_p99_s * 1000:g} ms", f"ITL p99 <= {slo.itl_p99_s * 1000:g} ms", "all SLOs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * 8 + ["---"] * 5) + "|"]
    for result in results:
        checks = slo.checks(result)
        cells = [f"{result.rate_per_s:g}", f"{result.num_ok} / {result.num_sent}", f"{result.achieved_per_s:.2f}",
                 f"{result.output_tokens_per_s:.1f}", _ms_pair(result.ttft_s), _ms_pair(result.tpot_s),
                 _ms_pair(result.itl_s),
                 "n/a" if result.tokens_per_chunk is None else f"{result.tokens_per_chunk:.2f}",
                 _errors_cell(result.errors),
                 *("yes" if checks[name] else "no" for name in ("TTFT", "TPOT", "ITL")),
                 "**yes**" if result.meets(slo) else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def served_model(args: argparse.Namespace) -> tuple[str, int | None]:
    """(model id, its max_model_len or None) from /v1/models: `--model`'s card, or the first."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    cards = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=60).json()["data"]
    card = next((c for c in cards if c["id"] == args.model), None) if args.model else cards[0]
    if card is None:
        return args.model, None
    return card["id"], card.get("max_model_len")


async def sweep(args: argparse.Namespace, model: str, spec: WorkloadSpec, slo: Slo,
                max_model_len: int | None) -> tuple[list[PassResult], list[float], str]:
    """The passes run, the rates left out and why."""
    passes: list[PassResult] = []
    async with client_session(args) as session:
        if args.warmup_requests:
            warmup = spec.build(args.warmup_requests, pass_seed(args.seed, -1), max_model_len)
            results, wall_s, _ = await send_on_schedule(session, args, model, warmup, [0.0] * warmup.num_requests)
            failed = sum(not r.ok for r in results)
            print(f"warm-up: {warmup.num_requests} requests at once, {failed} failed, {wall_s:.1f} s", flush=True)
            await asyncio.sleep(args.sweep_gap_s)
        sweep_started = time.perf_counter()
        consecutive_misses = 0
        last_drain_s = 0.0
        for index, rate in enumerate(args.sweep_rates):
            if index:
                await asyncio.sleep(args.sweep_gap_s)
            seed = pass_seed(args.seed, index)
            arrivals_s = poisson_arrivals_s(rate, args.duration_s, args.num_requests, seed + 1)
            if args.sweep_budget_s is not None:
                expected_end_s = time.perf_counter() - sweep_started + arrivals_s[-1] + last_drain_s
                if expected_end_s > args.sweep_budget_s:
                    return passes, list(args.sweep_rates[index:]), (
                        f"the pass at {rate:g} req/s would end about {expected_end_s:.0f} s into the sweep, "
                        f"past --sweep-budget-s {args.sweep_budget_s:g}")
            workload = spec.build(len(arrivals_s), seed, max_model_len)
            delays_before = await asyncio.to_thread(service_delays.snapshot, args.metrics_url)
            cpu_started_s = time.process_time()
            results, wall_s, max_lag_s = await send_on_schedule(session, args, model, workload, arrivals_s)
            result = summarize_pass(rate, workload, results, wall_s, max_lag_s, time.process_time() - cpu_started_s)
            if args.metrics_url:
                await asyncio.sleep(args.metrics_settle_s)  # the agents export every report interval
                delays_after = await asyncio.to_thread(service_delays.snapshot, args.metrics_url)
                result = dataclasses.replace(result, service_delays=service_delays.quantiles(delays_before, delays_after))
            passes.append(result)
            last_drain_s = max(0.0, wall_s - arrivals_s[-1])
            is_met = result.meets(slo)
            p99s_ms = " / ".join("n/a" if m is None else f"{m['p99'] * 1000:.1f}"
                                 for m in (result.ttft_s, result.tpot_s, result.itl_s))
            print(f"pass {index + 1}/{len(args.sweep_rates)}: {rate:g} req/s offered, {result.num_ok} / "
                  f"{result.num_sent} ok in {wall_s:.1f} s, TTFT / TPOT / ITL p99 {p99s_ms} ms, "
                  f"SLOs {'met' if is_met else 'missed'}", flush=True)
            if result.service_delays is not None:
                print(f"  inside the service: {service_delays.describe(result.service_delays)}", flush=True)
            consecutive_misses = 0 if is_met else consecutive_misses + 1
            if args.stop_after_miss and consecutive_misses >= args.stop_after_miss:
                return passes, list(args.sweep_rates[index + 1:]), f"{consecutive_misses} missed passes in a row"
    return passes, [], ""


def run_sweep(args: argparse.Namespace) -> None:
    model, max_model_len = served_model(args)
    spec = workload_spec(args)
    slo = Slo(args.slo_ttft_p99_s, args.slo_tpot_p99_ms / 1000, args.slo_itl_p99_ms / 1000)
    passes, not_run, why_not_run = asyncio.run(sweep(args, model, spec, slo, max_model_len))
    goodput = choose_goodput([(p.rate_per_s, p.meets(slo)) for p in passes])
    cap = f" or {args.num_requests} requests" if args.num_requests else ""
    print(f"\n### serve_bench sweep: {model} at {args.url}, Poisson passes of {args.duration_s:g} s{cap}, streamed; "
          f"{spec.describe(max_model_len)}; max_model_len {max_model_len}, seed {args.seed}\n")
    print(sweep_table(passes, slo))
    print()
    if not_run:
        print(f"not run: {', '.join(f'{rate:g}' for rate in not_run)} req/s ({why_not_run})")
    lagging = [p for p in passes if p.max_send_lag_s > 0.1 or p.client_cpu_s > 0.8 * p.wall_s]
    for p in lagging:
        print(f"note: at {p.rate_per_s:g} req/s the client sent up to {p.max_send_lag_s * 1000:.0f} ms late and used "
              f"{p.client_cpu_s:.1f} s of CPU in {p.wall_s:.1f} s: the client may have set the pace")
    for p in passes:
        if p.service_delays is not None:
            print(f"inside the service at {p.rate_per_s:g} req/s: {service_delays.describe(p.service_delays)}")
    print(goodput.describe())
    if args.json_out:
        write_json(Path(args.json_out), {
            "model": model, "url": args.url, "workload": args.workload,
            "workload_description": spec.describe(max_model_len), "max_model_len": max_model_len, "duration_s": args.duration_s, "num_requests_cap": args.num_requests,
            "seed": args.seed, "slo": asdict(slo), "commit": git_commit(REPO_DIR),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "passes": [{**p.to_json(), "checks": slo.checks(p), "slo_met": p.meets(slo)} for p in passes],
            "rates_not_run": not_run, "why_not_run": why_not_run,
            "goodput": asdict(goodput), "goodput_line": goodput.describe(),
        })


# ---- the service and the offline engine ----------------------------------------------------------
def engine_args(items: list[str]) -> dict[str, Any]:
    """`field=value` pairs as EngineConfig keyword arguments (numbers, booleans and null parsed)."""
    config: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        config[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false", "null") else value
    return config


@contextlib.contextmanager
def local_service(model: str | None, engine: dict[str, Any], max_ongoing: int) -> Iterator[str]:
    """The service on a local Ray cluster, one replica, HTTP on a free loopback port; yields its URL."""
    import ray
    from ray import serve

    from pagedserve.serve_app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)  # logical CPUs: replicas never wait
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = {"model": model, "num_replicas": 1, "max_ongoing_requests": max_ongoing,
                    "router": {"max_queued_requests": max_ongoing, "queue_timeout_s": 600}, **engine}
        serve.run(build_app(app_args), name="serve-bench", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900  # the demo model is built on first use (about two minutes)
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            time.sleep(1.0)
        else:
            raise RuntimeError("the service did not answer /v1/models within 900 s")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def run_offline(args: argparse.Namespace, served_model: str, prompts: list) -> tuple[float, int]:
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.core.request import SamplingParams

    model = None if served_model == "pagedserve-demo" else (args.offline_model or served_model)
    llm = LLM(model, **engine_args(args.offline_arg))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=args.seed)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up, as the service was warm
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(c.token_ids) for o in outputs for c in o.outputs)


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    prompt_mean, output_mean = args.sharegpt_means
    return WorkloadSpec(
        kind=args.workload, max_tokens=args.max_tokens, prompt_words=args.prompt_words,
        prompt_lens=tuple(args.prompt_lens) if args.prompt_lens else None, vocab_size=args.vocab_size,
        sharegpt_prompt_lens=LognormalLengths(prompt_mean, SHAREGPT_PROMPT_LENS.sigma, SHAREGPT_PROMPT_LENS.min_len,
                                              SHAREGPT_PROMPT_LENS.max_len),
        sharegpt_output_lens=LognormalLengths(output_mean, SHAREGPT_OUTPUT_LENS.sigma, SHAREGPT_OUTPUT_LENS.min_len,
                                              SHAREGPT_OUTPUT_LENS.max_len),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id; default: the first of /v1/models")
    parser.add_argument("--lora-models", nargs="+", default=None, metavar="NAME",
                        help="LoRA adapters the service serves: request i names adapter i mod N (docs/lora.md)")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                        help="bearer token (default: $PAGEDSERVE_API_KEY, as the service reads it)")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests of the run (default 64), of each sweep pass (default: no cap)")
    parser.add_argument("--duration-s", type=float, default=None,
                        help="stop sending after this long (default 300 s; a sweep pass 30 s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests per second")
    group.add_argument("--concurrency", type=int, default=None, help="fixed number of requests in flight")
    group.add_argument("--sweep-rates", type=float, nargs="+", default=None, metavar="RATE",
                       help="one Poisson pass per rate (run in increasing order) and the goodput (see above)")
    parser.add_argument("--workload", choices=WORKLOADS, default="uniform", help="prompt and output lengths (above)")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--prompt-lens", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="random token-id prompts with lengths uniform in [MIN, MAX] (as bench/gpu_bench.py's "
                             "W1: --prompt-lens 64 1024 --vocab-size 128000) instead of words")
    parser.add_argument("--vocab-size", type=int, default=128000,
                        help="token ids of --prompt-lens and of the sharegpt workload are below this")
    parser.add_argument("--sharegpt-means", type=float, nargs=2, metavar=("IN", "OUT"),
                        default=(SHAREGPT_PROMPT_LENS.mean, SHAREGPT_OUTPUT_LENS.mean),
                        help="mean prompt and output lengths of the sharegpt workload (sigmas stay)")
    parser.add_argument("--no-stream", action="store_true",
                        help="one response per request (no TTFT/ITL; the transport's per-token cost left out)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens of each uniform request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    sweep_group = parser.add_argument_group("goodput sweep (with --sweep-rates)")
    sweep_group.add_argument("--slo-ttft-p99-s", type=float, default=1.0)
    sweep_group.add_argument("--slo-tpot-p99-ms", type=float, default=50.0)
    sweep_group.add_argument("--slo-itl-p99-ms", type=float, default=100.0)
    sweep_group.add_argument("--stop-after-miss", type=int, default=0,
                             help="end the sweep after this many missed passes in a row (0: run every rate)")
    sweep_group.add_argument("--sweep-gap-s", type=float, default=2.0, help="idle time after each pass")
    sweep_group.add_argument("--metrics-url", action="append", default=[],
                             help="a Ray metrics agent's Prometheus endpoint (repeat per node): each pass also "
                             "reports where tokens waited inside the service (bench/service_delays.py)")
    sweep_group.add_argument("--metrics-settle-s", type=float, default=2.5,
                             help="wait after a pass before reading the metrics (Ray's export interval)")
    sweep_group.add_argument("--sweep-budget-s", type=float, default=None,
                             help="start no pass expected (its sending time + the last pass's drain) to end "
                                  "later than this after the first pass started")
    sweep_group.add_argument("--warmup-requests", type=int, default=0,
                             help="requests sent at once before the first pass, unmeasured")
    sweep_group.add_argument("--json-out", default=None, help="write the passes, SLOs and goodput here")
    parser.add_argument("--offline", action="store_true", help="also run the offline engine on the same workload")
    parser.add_argument("--offline-model", default=None, help="path for the offline engine (default: served id)")
    parser.add_argument("--offline-arg", action="append", default=[],
                        help="EngineConfig field=value, repeatable (with --start-service, the service's too)")
    parser.add_argument("--start-service", action="store_true",
                        help="start the service here on a local Ray, run, and stop it (see above)")
    parser.add_argument("--service-model", default=None, help="with --start-service: hub id or path (default: demo)")
    args = parser.parse_args(argv)
    if args.sweep_rates:
        if args.offline or args.no_stream:
            parser.error("--sweep-rates measures streamed latency against the SLOs: drop --offline and --no-stream")
        if min(args.sweep_rates) <= 0:
            parser.error(f"--sweep-rates must be > 0, got {args.sweep_rates}")
        args.sweep_rates = sorted(set(args.sweep_rates))
        if args.duration_s is None:
            args.duration_s = 30.0
    else:
        sweep_only = {"--json-out": args.json_out, "--warmup-requests": args.warmup_requests,
                      "--stop-after-miss": args.stop_after_miss, "--sweep-budget-s": args.sweep_budget_s}
        given = [flag for flag, value in sweep_only.items() if value]
        if given:
            parser.error(f"{', '.join(given)} only apply with --sweep-rates")
        if args.num_requests is None:
            args.num_requests = 64
        if args.duration_s is None:
            args.duration_s = 300.0
        if args.rate is None and args.concurrency is None:
            args.concurrency = 8
    if args.offline and args.workload != "uniform":
        parser.error("--offline compares one --max-tokens for every request: use --workload uniform")
    if args.rate is not None and args.rate <= 0:
        parser.error(f"--rate must be > 0, got {args.rate}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    measure = run_sweep if args.sweep_rates else run
    if args.start_service:
        if args.offline_model is None:
            args.offline_model = args.service_model
        max_ongoing = max(256, 2 * (args.concurrency or 0))
        with local_service(args.service_model, engine_args(args.offline_arg), max_ongoing) as url:
            args.url = url
            served = measure(args)
        # After the service has stopped, so that the offline engine has the machine to itself.
    else:
        served = measure(args)
    if args.offline:
        report_offline(args, *served)


def report_offline(args: argparse.Namespace, model: str, prompts: list, output_tokens: int, elapsed: float) -> None:
    offline_s, offline_tokens = run_offline(args, model, prompts)
    offline_rate = offline_tokens / offline_s
    print(f"| offline engine output tokens/s (same {len(prompts)} prompts) | {offline_rate:.1f} |")
    print(f"| service / offline output tokens/s | {(output_tokens / elapsed) / offline_rate:.2f} |")


def run(args: argparse.Namespace) -> tuple[str, list, int, float]:
    """Load the service at `args.url` and print the table; returns what the offline comparison needs."""
    model, max_model_len = served_model(args)
    workload = workload_spec(args).build(args.num_requests, args.seed, max_model_len)
    results, elapsed = asyncio.run(run_load(args, model, workload))

    ok = [r for r in results if r.ok]
    output_tokens = sum(r.num_output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    load = f"rate {args.rate}/s (Poisson)" if args.rate else f"concurrency {args.concurrency}"
    mode = "one response per request" if args.no_stream else "streamed"
    print(f"\n### serve_bench: {model} at {args.url}, {load}, {mode}; {workload.description}\n")
    print("| metric | value |\n|---|---|")
    print(f"| requests ok / sent | {len(ok)} / {len(results)} |")
    print(f"| errors | {errors or 'none'} |")
    print(f"| wall time | {elapsed:.2f} s |")
    print(f"| request throughput | {len(ok) / elapsed:.2f} req/s |")
    print(f"| output tokens/s | {output_tokens / elapsed:.1f} |")
    print(f"| TTFT p50 / p90 / p99 (ms) | {percentiles([r.ttft_s for r in ok if r.ttft_s is not None])} |")
    print(f"| TPOT p50 / p90 / p99 (ms) | {percentiles([r.tpot_s for r in ok if r.tpot_s is not None])} |")
    print(f"| ITL p50 / p90 / p99 (ms) | {percentiles([gap for r in ok for gap in r.itl_s])} |")
    per_chunk = tokens_per_chunk(ok)
    if per_chunk is not None:
        print(f"| output tokens per text chunk | {per_chunk:.2f} |")
    print(f"| E2E p50 / p90 / p99 (ms) | {percentiles([r.e2e_s for r in ok])} |")
    if ok:
        print(f"| mean output tokens per request | {statistics.mean(r.num_output_tokens for r in ok):.1f} |")
    return model, workload.prompts[:len(results)], output_tokens, elapsed


if __name__ == "__main__":
    main()
