"""HTTP load generator for a running pagedserve service, compared with the offline engine in the same run.

    python bench/serve_bench.py --url http://127.0.0.1:8000 --num-requests 64 --rate 4
    python bench/serve_bench.py --concurrency 16 --max-tokens 64 --offline --offline-arg num_blocks=512

Arrivals are Poisson at `--rate` requests/s, or a fixed number in flight with `--concurrency`; the run
stops after `--num-requests` or `--duration-s`, whichever comes first. Every request streams
`/v1/completions` (ignore_eos, so output lengths are fixed) and the client times each chunk:

- TTFT: request sent -> first token; TPOT: (end - first token) / (output tokens - 1);
  ITL: gaps between consecutive chunks; E2E: request sent -> last byte.

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
import json
import os
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = (
    "the model reads a prompt and writes tokens one at a time while the scheduler keeps every sequence "
    "in paged blocks of the cache so that many requests share one batch and none waits for the longest"
).split()


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    num_output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


def make_prompts(num: int, prompt_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(num)]


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


async def run_load(args: argparse.Namespace, model: str, prompts: list) -> tuple[list[RequestResult], float]:
    # aiohttp, not httpx: at 512 requests in flight httpx's connection pool cost the client 3.9 s of CPU
    # for 512 one-response requests that aiohttp sends in 0.16 s on a local server, so the
    # load generator, not the service, set the pace.
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: list[RequestResult] = []
    rng = random.Random(args.seed + 1)
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: --concurrency is the cap
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)
    async with aiohttp.ClientSession(args.url, connector=connector, timeout=timeout, headers=headers) as session:
        started = time.perf_counter()
        deadline = started + args.duration_s
        tasks: list[asyncio.Task] = []

        async def run_one(prompt: str | list[int]) -> None:
            results.append(await one_request(session, model, prompt, args.max_tokens, args.temperature,
                                             stream=not args.no_stream))

        if args.concurrency:
            queue = list(prompts)

            async def worker() -> None:
                while queue and time.perf_counter() < deadline:
                    await run_one(queue.pop(0))

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        else:
            for prompt in prompts:
                if time.perf_counter() >= deadline:
                    break
                tasks.append(asyncio.create_task(run_one(prompt)))
                await asyncio.sleep(rng.expovariate(args.rate))
            await asyncio.gather(*tasks)
        return results, time.perf_counter() - started


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return f"{at(0.5) * 1000:.1f} / {at(0.9) * 1000:.1f} / {at(0.99) * 1000:.1f}"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id; default: the first of /v1/models")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                        help="bearer token (default: $PAGEDSERVE_API_KEY, as the service reads it)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=300.0, help="stop sending after this long")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests per second")
    group.add_argument("--concurrency", type=int, default=None, help="fixed number of requests in flight")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--prompt-lens", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="random token-id prompts with lengths uniform in [MIN, MAX] (as bench/gpu_bench.py's "
                             "W1: --prompt-lens 64 1024 --vocab-size 128000) instead of words")
    parser.add_argument("--vocab-size", type=int, default=128000, help="token ids of --prompt-lens are below this")
    parser.add_argument("--no-stream", action="store_true",
                        help="one response per request (no TTFT/ITL; the transport's per-token cost left out)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--offline", action="store_true", help="also run the offline engine on the same workload")
    parser.add_argument("--offline-model", default=None, help="path for the offline engine (default: served id)")
    parser.add_argument("--offline-arg", action="append", default=[],
                        help="EngineConfig field=value, repeatable (with --start-service, the service's too)")
    parser.add_argument("--start-service", action="store_true",
                        help="start the service here on a local Ray, run, and stop it (see above)")
    parser.add_argument("--service-model", default=None, help="with --start-service: hub id or path (default: demo)")
    args = parser.parse_args()
    if args.rate is None and args.concurrency is None:
        args.concurrency = 8
    if args.start_service:
        if args.offline_model is None:
            args.offline_model = args.service_model
        max_ongoing = max(256, 2 * (args.concurrency or 0))
        with local_service(args.service_model, engine_args(args.offline_arg), max_ongoing) as url:
            args.url = url
            served = run(args)
        # After the service has stopped, so that the offline engine has the machine to itself.
    else:
        served = run(args)
    if args.offline:
        report_offline(args, *served)


def report_offline(args: argparse.Namespace, model: str, prompts: list, output_tokens: int, elapsed: float) -> None:
    offline_s, offline_tokens = run_offline(args, model, prompts)
    offline_rate = offline_tokens / offline_s
    print(f"| offline engine output tokens/s (same {len(prompts)} prompts) | {offline_rate:.1f} |")
    print(f"| service / offline output tokens/s | {(output_tokens / elapsed) / offline_rate:.2f} |")


def run(args: argparse.Namespace) -> tuple[str, list, int, float]:
    """Load the service at `args.url` and print the table; returns what the offline comparison needs."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{args.url}/v1/models", headers=headers, timeout=60).json()["data"][0]["id"]
    if args.prompt_lens:
        from common import random_token_workload

        workload = random_token_workload(args.num_requests, args.prompt_lens[0], args.prompt_lens[1], args.max_tokens,
                                         vocab_size=args.vocab_size, seed=args.seed)
        prompts: list = workload.prompts
        prompt_kind = workload.description
    else:
        prompts = make_prompts(args.num_requests, args.prompt_words, args.seed)
        prompt_kind = f"{args.prompt_words}-word prompts, {args.max_tokens} output tokens"
    results, elapsed = asyncio.run(run_load(args, model, prompts))

    ok = [r for r in results if r.ok]
    output_tokens = sum(r.num_output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    load = f"rate {args.rate}/s (Poisson)" if args.rate else f"concurrency {args.concurrency}"
    mode = "one response per request" if args.no_stream else "streamed"
    print(f"\n### serve_bench: {model} at {args.url}, {load}, {mode}; {prompt_kind}\n")
    print("| metric | value |\n|---|---|")
    print(f"| requests ok / sent | {len(ok)} / {len(results)} |")
    print(f"| errors | {errors or 'none'} |")
    print(f"| wall time | {elapsed:.2f} s |")
    print(f"| request throughput | {len(ok) / elapsed:.2f} req/s |")
    print(f"| output tokens/s | {output_tokens / elapsed:.1f} |")
    print(f"| TTFT p50 / p90 / p99 (ms) | {percentiles([r.ttft_s for r in ok if r.ttft_s is not None])} |")
    print(f"| TPOT p50 / p90 / p99 (ms) | {percentiles([r.tpot_s for r in ok if r.tpot_s is not None])} |")
    print(f"| ITL p50 / p90 / p99 (ms) | {percentiles([gap for r in ok for gap in r.itl_s])} |")
    print(f"| E2E p50 / p90 / p99 (ms) | {percentiles([r.e2e_s for r in ok])} |")
    if ok:
        print(f"| mean output tokens per request | {statistics.mean(r.num_output_tokens for r in ok):.1f} |")
    return model, prompts[:len(results)], output_tokens, elapsed


if __name__ == "__main__":
    main()
