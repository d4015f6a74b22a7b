"""Where a decode step's time goes: cProfile of engine steps, and the model forward timed alone.

    python bench/profile_step.py --layers 32 --batch 1 --steps 40
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import build_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--attention-backend", default="auto")
    args = parser.parse_args()
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.request import SamplingParams

    model, tokenizer = build_model(args)
    llm = LLM.from_model(model, tokenizer, max_num_seqs=max(args.batch, 8), attention_backend=args.attention_backend)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.steps + 10, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", list(range(1000, 1128)), params)
    for _ in range(5):  # prefill and warm-up
        engine.step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    step_ms = (time.perf_counter() - started) / args.steps * 1000
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    # The forward alone, same shapes, synchronised.
    output = engine.scheduler.schedule()
    step_input = engine._build_step_input(output)
    for _ in range(3):
        engine.runner.execute(step_input)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        engine.runner.execute(step_input)
    torch.cuda.synchronize()
    forward_ms = (time.perf_counter() - started) / 10 * 1000
    print(f"batch {args.batch}, {args.layers} layers: engine step {step_ms:.2f} ms; runner.execute alone {forward_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
