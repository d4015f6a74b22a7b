"""W1 through `AsyncLLMEngine` as a replica drives it, without HTTP or Ray: where served throughput goes.

Served W1 ends below the offline figure (docs/benchmarks.md). Between `LLM.generate` (offline) and the
service sit: the engine core in its own process (results over a pipe, as on a served GPU), every
request a stream consumed on an event loop, and requests that reach the engine over seconds instead of
at once. This script runs W1 through the async engine, one pass per `--arrival-spread-s` value
(arrival times uniform over that many seconds; 0: all at once), on one warm engine, and prints a table:
output tokens/s, TTFT percentiles, and the engine's steps: their count, their summed `step_time_s`
(scheduling, launch, and the delivery of the previous step's tokens) and the wall time outside that
(building the step's outputs, the loop's own work, idle time: the GPU is busy meanwhile unless the
host is the bottleneck).

    python bench/async_w1.py --arrival-spread-s 0 2 7            # the Llama-3-8B shape on a GPU
    python bench/async_w1.py --layers 2 --num-requests 32 --max-new-tokens 16 --arrival-spread-s 0 1   # a check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RequestTiming, random_token_workload, summarize_timings  # noqa: E402
from gpu_bench import step_time_summary, write_model_dir  # noqa: E402


async def one_pass(engine, workload, spread_s: float, seed: int) -> dict:
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=workload.max_new_tokens, ignore_eos=True)
    rng = random.Random(seed)
    delays = sorted(rng.uniform(0, spread_s) for _ in workload.prompts) if spread_s > 0 else [0.0] * len(workload.prompts)
    started = time.perf_counter()
    timings: list[RequestTiming] = []

    async def one(index: int, prompt: list[int], delay: float) -> None:
        await asyncio.sleep(max(0.0, started + delay - time.perf_counter()))
        sent = time.perf_counter()
        first = last = None
        num_tokens = 0
        async for delta in engine.generate(prompt, params, f"w1-{seed}-{index}"):
            now = time.perf_counter()
            num_tokens += len(delta.outputs[0].token_ids)
            first = now if first is None else first
            last = now
        timings.append(RequestTiming(sent, first, last, num_tokens))

    await asyncio.gather(*(one(i, p, d) for i, (p, d) in enumerate(zip(workload.prompts, delays))))
    wall_s = time.perf_counter() - started
    ttft, tpot = summarize_timings(timings)
    return {"spread_s": spread_s, "wall_s": wall_s, "output_tokens": sum(t.num_output_tokens for t in timings),
            "ttft_s": ttft, "tpot_s": tpot}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--min-prompt-len", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32, help="32 is Llama-3-8B")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--arrival-spread-s", type=float, nargs="+", default=[0.0])
    parser.add_argument("--no-engine-process", dest="engine_process", action="store_false",
                        help="the step loop on a thread of this process instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from pagedserve.engine.async_engine import AsyncLLMEngine

    workload = random_token_workload(args.num_requests, args.min_prompt_len, args.max_prompt_len,
                                     args.max_new_tokens, vocab_size=128000, seed=0)
    print(workload.description, flush=True)
    model_dir = Path(tempfile.mkdtemp(prefix="w1-model-"))
    write_model_dir(model_dir, args.layers)
    started = time.perf_counter()
    engine = AsyncLLMEngine.from_kwargs(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", device=args.device,
        max_num_seqs=args.max_num_seqs, max_memory_percent=0.9, enable_prefix_caching=False,
        engine_process=args.engine_process,
    )
    print(f"engine start: {time.perf_counter() - started:.1f} s (engine process: {args.engine_process})", flush=True)
    steps: list = []
    engine.add_step_listener(lambda step, stats: steps.append(step))
    rows = []
    try:
        # Warm-up, as gpu_bench.py: the shapes of a short prompt and a mixed batch compiled before any clock.
        asyncio.run(one_pass(engine, random_token_workload(2, 16, 128, 4, vocab_size=128000, seed=1), 0.0, 99))
        for spread_s in args.arrival_spread_s:
            steps.clear()
            row = asyncio.run(one_pass(engine, workload, spread_s, seed=len(rows)))
            row["steps"] = len(steps)
            row["step_time_s"] = sum(s.step_time_s for s in steps)
            row["preempted"] = sum(s.num_preempted for s in steps)
            rows.append(row)
            print(f"--- arrivals over {spread_s:g} s: {row['output_tokens'] / row['wall_s']:.1f} output tok/s\n"
                  f"{step_time_summary(steps)}", flush=True)
    finally:
        engine.shutdown()
    if args.out:
        args.out.write_text(json.dumps({"workload": workload.description, "engine_process": args.engine_process,
                                        "passes": rows}, indent=2))
    print("\n| arrivals over | output tok/s | wall | TTFT p50 / p90 / p99 | steps | step_time_s summed | wall - that |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for row in rows:
        ttft = row["ttft_s"] or {}
        print(f"| {row['spread_s']:g} s | {row['output_tokens'] / row['wall_s']:.1f} | {row['wall_s']:.2f} s | "
              f"{ttft.get('p50', 0):.2f} / {ttft.get('p90', 0):.2f} / {ttft.get('p99', 0):.2f} s | {row['steps']} | "
              f"{row['step_time_s']:.2f} s | {row['wall_s'] - row['step_time_s']:.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
