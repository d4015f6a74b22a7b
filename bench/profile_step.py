"""Where a decode step's time goes: wall time per engine step, GPU busy time per step, the host's share.

    python bench/profile_step.py --layers 32 --batch 1 --steps 40
    python bench/profile_step.py --batch 256 --steps 20 --cprofile
    python bench/profile_step.py --batch 1 256 --adapters 8     # the same steps with base rows, then under 8 LoRA
                                                                # adapters (request i under adapter i mod 8)

The engine step's wall time against the GPU's busy time in the same steps (the union of torch.profiler's
kernel and copy spans) says whether the step is bound by the device or by the host code around it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_events, kernel_table, parse_engine_args  # noqa: E402
from gpu_bench import build_model, decode_step_profile, record_steps  # noqa: E402


def gpu_spans(prof) -> list[tuple[float, float]]:
    return sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA)


def gpu_busy_us(prof) -> float:
    """Time at least one kernel or copy ran (the union of their spans). Kernels launched with programmatic
    dependent launch overlap their predecessor while they wait, so their own times would count twice."""
    busy, end = 0.0, float("-inf")
    for start, stop in gpu_spans(prof):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def gpu_idle_summary(prof) -> str:
    """Gaps between consecutive GPU kernels/copies: total idle time and the largest gaps."""
    spans = gpu_spans(prof)
    if len(spans) < 2:
        return "no GPU events"
    gaps = [max(0, b[0] - a[1]) for a, b in zip(spans, spans[1:])]
    busy_end = spans[0][1]
    idle = 0
    for start, end in spans[1:]:
        idle += max(0, start - busy_end)
        busy_end = max(busy_end, end)
    largest = sorted(gaps, reverse=True)[:5]
    return (f"{idle / 1000:.2f} ms idle over {(busy_end - spans[0][0]) / 1000:.2f} ms; "
            f"largest gaps (us): {', '.join(f'{g:.0f}' for g in largest)}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--context", type=int, default=128, help="prompt length of each request")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--cprofile", action="store_true", help="also print the 25 costliest host functions")
    parser.add_argument("--trace", default=None,
                        help="also write a Chrome trace (host and GPU) of 10 steps of each batch to TRACE.<batch>.json")
    parser.add_argument("--engine-arg", action="append", default=[], help="EngineConfig override, key=value")
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none",
                        help="fp8: the decoder linears as quantization='fp8' loads them (e4m3 weights)")
    parser.add_argument("--adapters", type=int, default=0,
                        help="also profile each batch under this many random LoRA adapters (PEFT files in a temporary "
                             "folder, q/k/v/o and gate/up/down), beside its base rows on the same engine")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="each measured step also takes a new request's prompt of this many tokens (one new token, "
                             "under the run's adapters when it has them): mixed steps, as under load")
    parser.add_argument("--kernels", type=int, default=16, help="kernels listed per profiled batch (costliest first)")
    parser.add_argument("--single-tokens", type=int, default=0,
                        help="also time LLM.generate of one --context-token prompt and this many new tokens "
                             "(gpu_bench's batch-1 line), with where its time went")
    args = parser.parse_args()
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.core.request import SamplingParams

    overrides = parse_engine_args(args.engine_arg)
    model, tokenizer = build_model(args)
    if args.quantization == "fp8":
        from pagedserve.engine.kernels.fp8_linear import quantize_linears

        quantize_linears(model)
        torch.cuda.empty_cache()
    largest = max(args.batch)
    adapter_names: list[str | None] = [None]
    if args.adapters:
        from lora_bench import write_adapters

        adapter_folder = tempfile.TemporaryDirectory(prefix="profile-step-adapters-")
        adapters = write_adapters(model, Path(adapter_folder.name), args.adapters, args.lora_rank)
        overrides.update(lora_modules=adapters, max_loras=args.adapters, max_lora_rank=args.lora_rank)
        adapter_names = [None, *adapters]
    llm = LLM.from_model(model, tokenizer, max_num_seqs=max(largest, 8), attention_backend=args.attention_backend,
                         cuda_graph_max_batch_size=max(largest, 8), enable_prefix_caching=False, **overrides)
    engine = llm.engine
    # What a pinned host tensor costs here (a step makes a few).
    started = time.perf_counter()
    for _ in range(200):
        torch.tensor([1, 2, 3], dtype=torch.long, pin_memory=True).to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    print(f"pinned 3-element tensor to the GPU: {(time.perf_counter() - started) / 200 * 1e6:.1f} us", flush=True)
    rows = []
    runs = [(batch, lora) for batch in args.batch for lora in ([False, True] if args.adapters else [False])]
    for batch, lora in runs:
        label = f"{batch}, {args.adapters} adapters" if lora else str(batch)
        prefix = f"b{batch}{'-lora' if lora else ''}"
        params = SamplingParams(temperature=0, max_tokens=args.steps * 3 + 20, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"{prefix}-{i}", list(range(1000 + i, 1000 + i + args.context)), params,
                               lora=adapter_names[1 + i % args.adapters] if lora else None)
        while engine.scheduler.waiting or any(not r.is_prefill_done for r in engine.scheduler.running):
            engine.step()
        for _ in range(5):
            engine.step()
        prompts_added = 0
        step_tokens: list[int] = []  # tokens each step scheduled: the timed and the profiled steps should match

        def step() -> None:
            nonlocal prompts_added
            if args.prompt_tokens:  # a new prompt each step, finished by the step after (one new token)
                prompts_added += 1
                engine.add_request(f"{prefix}-p{prompts_added}", [(7 * t + prompts_added) % 30000 + 100
                                                                   for t in range(args.prompt_tokens)],
                                   SamplingParams(temperature=0, max_tokens=1),
                                   lora=adapter_names[1 + prompts_added % args.adapters] if lora else None)
            engine.step()
            last = engine.last_step
            step_tokens.append(0 if last is None else last.num_prefill_tokens + last.num_decode_tokens)

        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - started) / args.steps * 1000
        timed_tokens, step_tokens[:] = sum(step_tokens), []
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        busy_us = gpu_busy_us(prof) or sum(e.self_device_time_total for e in prof.key_averages())
        gpu_ms = busy_us / args.steps / 1000
        print(f"tokens a step: {timed_tokens / args.steps:.0f} in the timed steps, {sum(step_tokens) / args.steps:.0f} "
              "in the profiled ones (the GPU busy share compares them only where these match)", flush=True)
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            profiler.disable()
            print(f"--- host profile, batch {label}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        print(f"--- GPU kernels, batch {label}: {gpu_ms:.2f} ms busy a step")
        print("| kernel | calls a step | us a step | share |")
        print("|---|---:|---:|---:|")
        for row in kernel_table(device_events(prof), args.steps)[:args.kernels]:
            print(f"| {row['name'][:90]} | {row['per_step']:.0f} | {row['us_per_step']:.0f} | {row['share']:.1%} |")
        if args.trace:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as traced:
                for _ in range(10):
                    engine.step()
                torch.cuda.synchronize()
            traced.export_chrome_trace(f"{args.trace}.{batch}{'-lora' if lora else ''}.json")
            print(f"GPU idle between kernels in 10 steps: {gpu_idle_summary(traced)}", flush=True)
        for request_id in [f"{prefix}-{i}" for i in range(batch)]:
            engine.abort(request_id)
        while engine.has_unfinished_requests():
            engine.step()
        rows.append((label, batch, step_ms, gpu_ms))
    if args.single_tokens:
        engine_step = engine.step
        steps = record_steps(engine)
        params = SamplingParams(temperature=0, max_tokens=args.single_tokens, ignore_eos=True)
        prompt = list(range(2000, 2000 + args.context))
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        for _ in range(2):
            steps.clear()
            torch.cuda.synchronize()
            started = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            torch.cuda.synchronize()
            wall_s = time.perf_counter() - started
            print(f"batch 1 end to end ({args.context}-token prompt, {args.single_tokens} new tokens): "
                  f"{args.single_tokens / wall_s:.1f} tok/s; {decode_step_profile(steps, wall_s)}", flush=True)
        engine.step = engine_step
    print(f"{args.layers} layers, context {args.context}"
          + (f"; each step with a new {args.prompt_tokens}-token prompt" if args.prompt_tokens else ""))
    print("| batch | engine step ms | GPU busy ms per step | GPU busy | tokens/s |")
    print("|---:|---:|---:|---:|---:|")
    for label, batch, step_ms, gpu_ms in rows:
        print(f"| {label} | {step_ms:.2f} | {gpu_ms:.2f} | {gpu_ms / step_ms:.0%} | {batch * 1000 / step_ms:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
