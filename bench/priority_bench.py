"""Priority scheduling under saturation, on one engine: TTFT of high- and low-priority requests.

Issue 28's bar: with the engine saturated, requests of high priority (vLLM's: a lower number is served earlier)
get their first token in at most a third of the time low-priority ones do (p50). First a burst of requests
measures what the engine serves a second (its capacity on this workload); then requests reach `AsyncLLMEngine`
at Poisson times at `--load` times that (1.5: the waiting line grows through the pass, while the high class
alone, half the requests, would fit); every other one is of priority 0, the rest 1; the same prompts, times and priorities run once under the
`priority` policy and once under `fifo` (the comparison: there both classes wait alike). Per policy and class:
requests finished, TTFT p50 / p99 and TPOT p50; then the ratio of the classes' TTFT p50. Prompts are random ids
(prefix caching off), outputs a fixed length (EOS ignored). Prints each pass as it ends and a markdown table
last; `--out` writes JSON.

    python bench/priority_bench.py                                   # CPU: a narrow model, seconds a pass
    python bench/priority_bench.py --no-tiny --layers 32 --max-num-seqs 256 --num-requests 1024  # GPU, 8B shape
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RequestTiming,
    git_commit,
    machine_description,
    poisson_arrivals_s,
    random_token_workload,
    run_within,
    summarize_timings,
    write_json,
)
from online_engine_bench import write_model_dir  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent.parent
PRIORITIES = (0, 1)  # high, low


async def one_pass(engine, prompts: list[list[int]], arrivals_s: list[float], classes: list[int], send_priority: bool,
                   max_new_tokens: int, max_drain_s: float, tag: str) -> dict[int, list[RequestTiming]]:
    """Send prompt i at arrivals_s[i], of priority classes[i] if `send_priority` (fifo refuses any but 0); the
    finished requests' timings by class."""
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_new_tokens, ignore_eos=True)
    started = time.perf_counter()
    timings: dict[int, list[RequestTiming]] = {priority: [] for priority in PRIORITIES}

    async def one(index: int) -> None:
        await asyncio.sleep(max(0.0, started + arrivals_s[index] - time.perf_counter()))
        sent = time.perf_counter()
        first = last = None
        num_tokens = 0
        priority = classes[index] if send_priority else 0
        async for delta in engine.generate(prompts[index], params, f"{tag}-{index}", priority=priority):
            last = time.perf_counter()
            first = last if first is None else first
            num_tokens += len(delta.outputs[0].token_ids)
        timings[classes[index]].append(RequestTiming(sent, first, last, num_tokens))

    await run_within([one(i) for i in range(len(prompts))], arrivals_s[-1] + max_drain_s)
    return timings


def _ms(latency: dict[str, float] | None, key: str) -> str:
    return "n/a" if latency is None else f"{latency[key] * 1000:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=float, default=1.5, help="requests offered over what the engine serves")
    parser.add_argument("--num-requests", type=int, default=96, help="requests of a pass (about)")
    parser.add_argument("--max-drain-s", type=float, default=300.0)
    parser.add_argument("--min-prompt-len", type=int, default=32)
    parser.add_argument("--max-prompt-len", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=128000, help="prompt ids are drawn below this")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-tiny", dest="tiny", action="store_false", help="the Llama-3-8B width (GPU)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="sequences a step: what saturates the engine")
    parser.add_argument("--num-blocks", type=int, default=None, help="default: sized from memory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from pagedserve.engine.async_engine import AsyncLLMEngine

    run_started = time.perf_counter()
    model_dir = Path(tempfile.mkdtemp(prefix="priority-model-"))
    write_model_dir(model_dir, args.layers, args.tiny)
    rows = []
    for policy in ("priority", "fifo"):
        engine = AsyncLLMEngine.from_kwargs(
            model=str(model_dir), load_format="dummy", device=args.device, max_num_seqs=args.max_num_seqs,
            num_blocks=args.num_blocks, enable_prefix_caching=False, scheduling_policy=policy)
        try:
            warm = random_token_workload(4, args.min_prompt_len, args.max_prompt_len, 4, args.vocab_size, seed=99)
            asyncio.run(one_pass(engine, warm.prompts, [0.0] * 4, [0] * 4, False, 4, 60.0, "warm"))
            if not rows:  # the first engine measures the capacity; both passes get the same schedule
                burst = random_token_workload(2 * args.max_num_seqs, args.min_prompt_len, args.max_prompt_len,
                                              args.max_new_tokens, args.vocab_size, seed=args.seed + 7)
                started = time.perf_counter()
                asyncio.run(one_pass(engine, burst.prompts, [0.0] * len(burst.prompts), [0] * len(burst.prompts),
                                     False, args.max_new_tokens, args.max_drain_s, "burst"))
                capacity_per_s = len(burst.prompts) / (time.perf_counter() - started)
                rate = args.load * capacity_per_s
                arrivals_s = poisson_arrivals_s(rate, args.num_requests / rate, None, seed=args.seed + 1)
                workload = random_token_workload(len(arrivals_s), args.min_prompt_len, args.max_prompt_len,
                                                 args.max_new_tokens, args.vocab_size, seed=args.seed)
                priorities = [PRIORITIES[i % 2] for i in range(len(arrivals_s))]
                print(f"capacity {capacity_per_s:.2f} req/s (a burst of {len(burst.prompts)}); offered {rate:.2f} req/s",
                      flush=True)
            timings = asyncio.run(one_pass(engine, workload.prompts, arrivals_s, priorities, policy == "priority",
                                           args.max_new_tokens, args.max_drain_s, policy))
        finally:
            engine.shutdown()
        row = {"policy": policy}
        for priority in PRIORITIES:
            ttft, tpot = summarize_timings(timings[priority])
            row[priority] = {"num_sent": priorities.count(priority), "num_finished": len(timings[priority]),
                             "ttft_s": ttft, "tpot_s": tpot}
        high, low = row[0]["ttft_s"], row[1]["ttft_s"]
        row["ttft_p50_high_over_low"] = high["p50"] / low["p50"] if high and low and low["p50"] else None
        rows.append(row)
        print(f"--- {policy}: TTFT p50 high {_ms(high, 'p50')} ms, low {_ms(low, 'p50')} ms "
              f"({time.perf_counter() - run_started:.0f} s so far)", flush=True)
    total_s = time.perf_counter() - run_started
    description = (f"{len(arrivals_s)} requests at Poisson {rate:.2f} req/s ({args.load:g}x the {capacity_per_s:.2f} "
                   f"req/s a burst was served at), priorities "
                   f"0 and 1 alternating, prompts uniform in [{args.min_prompt_len}, {args.max_prompt_len}] random ids, "
                   f"{args.max_new_tokens} output tokens, {'tiny' if args.tiny else 'Llama-3-8B'} shape with "
                   f"{args.layers} layers, max_num_seqs {args.max_num_seqs}, prefix caching off")
    if args.out:
        write_json(args.out, {"workload": description, "commit": git_commit(REPO_DIR),
                              "machine": machine_description(), "total_s": total_s, "passes": rows})
    print(f"\n{description}; whole run {total_s:.0f} s\n")
    header = ["policy", "class", "finished", "TTFT p50 / p99 (ms)", "TPOT p50 (ms)", "TTFT p50 high / low"]
    print("| " + " | ".join(header) + " |\n|" + "|".join(["---:"] * len(header)) + "|")
    for row in rows:
        for priority, name in zip(PRIORITIES, ("high (0)", "low (1)")):
            cell = row[priority]
            ratio = row["ttft_p50_high_over_low"]
            print("| " + " | ".join([
                row["policy"], name, f"{cell['num_finished']}/{cell['num_sent']}",
                f"{_ms(cell['ttft_s'], 'p50')} / {_ms(cell['ttft_s'], 'p99')}", _ms(cell["tpot_s"], "p50"),
                "n/a" if ratio is None else f"{ratio:.2f}" if priority == 0 else ""]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
