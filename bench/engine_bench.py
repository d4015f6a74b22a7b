"""Offline throughput on CPU: this engine (`LLM.generate`) vs transformers' continuous batching (`generate_batch`).

Both run the same model on the same workload in the same invocation: a few hundred requests of random token
ids with mixed prompt lengths, all submitted at once, greedy, EOS ignored so every request makes exactly
`--output-len` tokens. Each engine runs in its own subprocess so its peak RSS (VmHWM) is its own; both get
the same step budget (`--max-batch-tokens`), the same concurrency cap (`--max-num-seqs`) and a KV cache that
holds the whole workload, so neither preempts. Each does one small warmup generate before the timed one.
The parent checks that greedy outputs are token-identical, prints a markdown table for docs/benchmarks.md
and writes bench/results/engine_bench.json.

On a shared CPU only the ratios mean something. Usage:
    python bench/engine_bench.py [--model PATH] [--num-requests 200] [--min-prompt-len 16]
        [--max-prompt-len 160] [--output-len 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pagedserve.cache.blocks import blocks_for

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/engine_bench.py` finds bench/common.py

from common import (
    BenchResult,
    RequestTiming,
    Workload,
    comparison_table,
    current_rss_bytes,
    git_commit,
    machine_description,
    peak_rss_bytes,
    random_token_workload,
    summarize_timings,
    write_json,
)

REPO_DIR = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_PATH = REPO_DIR / "bench" / "results" / "engine_bench.json"
ENGINES = ("pagedserve", "generate_batch")
MEMORY_KIND = "process peak RSS (VmHWM), weights + KV cache + activations + Python/torch"
# transformers' page size default; each request's KV is whole pages of this many tokens.
HF_PAGE_SIZE = 256
WORKER_TIMEOUT_S = 900


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or hub id; default: the built-in demo model")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=160)
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="token budget of one step, both engines")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step, both engines")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads per engine (default: torch's)"
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS_PATH, help="where the JSON results go")
    # Internal: one engine's run inside a subprocess.
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- workers (run in a subprocess each) ------------------------------------------------------------
def _warmup_prompts(workload: Workload) -> list[list[int]]:
    """Four short prompts that share no prefix with the workload (they come from another seed)."""
    vocab = max(max(prompt) for prompt in workload.prompts) + 1
    return random_token_workload(4, 24, 24, 4, vocab, workload.seed + 1_000_003).prompts


def run_pagedserve(model_path: str, workload: Workload, args: argparse.Namespace) -> tuple[BenchResult, list]:
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.core.request import SamplingParams

    block_size = 16
    kv_blocks = sum(blocks_for(len(p) + workload.max_new_tokens, block_size) for p in workload.prompts) + 64
    started = time.perf_counter()
    llm = LLM(
        model=model_path,
        dtype="float32",
        block_size=block_size,
        num_blocks=kv_blocks,
        max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
    )
    warm = llm.generate(
        _warmup_prompts(workload), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    if any(len(out.outputs[0].token_ids) != 4 for out in warm):
        raise RuntimeError("pagedserve warmup did not make 4 tokens per request")
    setup_s = time.perf_counter() - started
    rss_before_bytes = current_rss_bytes()

    params = SamplingParams(max_tokens=workload.max_new_tokens, temperature=0.0, ignore_eos=True)
    cpu_started = time.process_time()
    started = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started

    token_ids = [list(out.outputs[0].token_ids) for out in outputs]
    timings = []
    for out, ids in zip(outputs, token_ids):
        m = out.metrics
        if m is not None and m.first_token_time is not None and m.last_token_time is not None:
            timings.append(RequestTiming(m.arrival_time, m.first_token_time, m.last_token_time, len(ids)))
    ttft, tpot = summarize_timings(timings)
    stats = llm.engine.get_stats()
    plan = llm.engine.memory_plan
    result = BenchResult(
        engine="pagedserve",
        num_requests=len(outputs),
        num_prompt_tokens=workload.num_prompt_tokens,
        num_output_tokens=sum(len(ids) for ids in token_ids),
        wall_s=wall_s,
        ttft_s=ttft,
        tpot_s=tpot,
        peak_memory_bytes=peak_rss_bytes(),
        memory_kind=MEMORY_KIND,
        cpu_s=cpu_s,
        details={
            "setup_s": setup_s,
            "rss_before_timed_run_bytes": rss_before_bytes,
            "attention_backend": llm.engine.runner.backend.name,
            "kv_cache_bytes": plan.kv_bytes,
            "num_blocks": list(plan.num_blocks),
            "block_size": block_size,
            "num_preemptions": stats.num_preemptions_total,
            "config": {"max_batch_tokens": args.max_batch_tokens, "max_num_seqs": args.max_num_seqs},
        },
    )
    return result, token_ids


def run_generate_batch(model_path: str, workload: Workload, args: argparse.Namespace) -> tuple[BenchResult, list]:
    import torch
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    requested_attn = model.config._attn_implementation
    # eos_token_id=-1 disables EOS (add_requests falls back to the model config's EOS only when it is None).
    generation_config = GenerationConfig(max_new_tokens=workload.max_new_tokens, do_sample=False, eos_token_id=-1)
    # Explicit sizing: on CPU transformers would otherwise size the cache from 90% of system RAM and zero it.
    kv_pages = sum(blocks_for(len(p) + workload.max_new_tokens, HF_PAGE_SIZE) for p in workload.prompts) + 8
    cb_config = ContinuousBatchingConfig(
        page_size=HF_PAGE_SIZE,
        num_blocks=kv_pages,
        max_batch_tokens=args.max_batch_tokens,
        max_requests_per_batch=args.max_num_seqs,
    )
    # persistent_manager: the warmup builds the manager (cache, attention switch) and the timed run reuses it,
    # so neither engine's timed run pays for its setup.
    warm = model.generate_batch(
        inputs=_warmup_prompts(workload),
        generation_config=generation_config,
        continuous_batching_config=cb_config,
        progress_bar=False,
        persistent_manager=True,
        max_new_tokens=4,
    )
    if len(warm) != 4 or any(len(out.generated_tokens) != 4 for out in warm.values()):
        raise RuntimeError("generate_batch warmup did not make 4 tokens per request")
    setup_s = time.perf_counter() - started
    rss_before_bytes = current_rss_bytes()
    cb_attn = model.config._attn_implementation

    cpu_started = time.process_time()
    started = time.perf_counter()
    results = model.generate_batch(
        inputs=workload.prompts,
        generation_config=generation_config,
        continuous_batching_config=cb_config,
        record_timestamps=True,
        progress_bar=False,
        persistent_manager=True,
    )
    wall_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    model.destroy_cached_continuous_batching_manager()

    ordered = list(results.values())  # generate_batch returns them in input order
    if len(ordered) != workload.num_requests or any(out.error for out in ordered):
        errors = [out.error for out in ordered if out.error][:3]
        raise RuntimeError(f"generate_batch returned {len(ordered)}/{workload.num_requests} results; errors {errors}")
    token_ids = [list(out.generated_tokens) for out in ordered]
    timings = [
        RequestTiming(out.created_time, out.timestamps[0], out.timestamps[-1], len(out.generated_tokens))
        for out in ordered
        if out.timestamps
    ]
    ttft, tpot = summarize_timings(timings)
    result = BenchResult(
        engine="generate_batch",
        num_requests=len(ordered),
        num_prompt_tokens=workload.num_prompt_tokens,
        num_output_tokens=sum(len(ids) for ids in token_ids),
        wall_s=wall_s,
        ttft_s=ttft,
        tpot_s=tpot,
        peak_memory_bytes=peak_rss_bytes(),
        memory_kind=MEMORY_KIND,
        cpu_s=cpu_s,
        details={
            "setup_s": setup_s,
            "rss_before_timed_run_bytes": rss_before_bytes,
            "attn_implementation_loaded": requested_attn,
            "attn_implementation_during_cb": cb_attn,
            "page_size": HF_PAGE_SIZE,
            "num_blocks": kv_pages,
            "config": {"max_batch_tokens": args.max_batch_tokens, "max_requests_per_batch": args.max_num_seqs},
        },
    )
    return result, token_ids


def run_worker(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    workload = Workload.from_json(json.loads(args.workload.read_text()))
    runner = run_pagedserve if args.worker == "pagedserve" else run_generate_batch
    result, token_ids = runner(args.model, workload, args)
    result.details["torch_num_threads"] = torch.get_num_threads()
    write_json(args.out, {"result": result.to_json(), "token_ids": token_ids})
    return 0


# ---- parent ----------------------------------------------------------------------------------------
def resolve_model(model: str | None) -> str:
    if model is not None:
        return model
    from pagedserve.demo import model as demo_model

    folder = demo_model.default_cache_dir() / f"demo-llama-v{demo_model._FORMAT_VERSION}"
    if not (folder / "model.safetensors").exists():
        print(f"building the demo model into {folder} first (once per machine, about 1-2 minutes)...", flush=True)
    return str(demo_model.demo_model_path())


def build_workload(model_path: str, args: argparse.Namespace) -> Workload:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and args.max_prompt_len + args.output_len > max_positions:
        raise SystemExit(
            f"--max-prompt-len {args.max_prompt_len} + --output-len {args.output_len} exceeds the model's "
            f"max_position_embeddings={max_positions}"
        )
    try:
        special_ids = AutoTokenizer.from_pretrained(model_path).all_special_ids
    except (OSError, ValueError):
        special_ids = []
    return random_token_workload(
        args.num_requests,
        args.min_prompt_len,
        args.max_prompt_len,
        args.output_len,
        config.vocab_size,
        args.seed,
        excluded_token_ids=special_ids,
    )


def run_engine_subprocess(engine: str, model_path: str, workload_path: Path, out_path: Path, args) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        engine,
        "--model",
        model_path,
        "--workload",
        str(workload_path),
        "--out",
        str(out_path),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-num-seqs",
        str(args.max_num_seqs),
        *(["--threads", str(args.threads)] if args.threads is not None else []),
    ]
    print(f"running {engine}...", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, timeout=WORKER_TIMEOUT_S)
    print(f"  {engine} done in {time.perf_counter() - started:.1f} s (process, including load and warmup)", flush=True)
    return json.loads(out_path.read_text())


def count_identical(first: list[list[int]], second: list[list[int]]) -> tuple[int, list[int]]:
    """(number of requests with identical token ids, indices of the rest)."""
    differing = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
    return len(first) - len(differing), differing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = [name for name in engines if name not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; choose from {list(ENGINES)}")

    started_at = datetime.datetime.now(datetime.UTC)
    machine = machine_description()
    model_path = resolve_model(args.model)
    workload = build_workload(model_path, args)
    print(f"model: {model_path}\nworkload: {workload.description}\nmachine: {machine}", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="engine_bench-") as tmp:
        workload_path = Path(tmp) / "workload.json"
        workload_path.write_text(json.dumps(workload.to_json()))
        for engine in engines:
            runs[engine] = run_engine_subprocess(engine, model_path, workload_path, Path(tmp) / f"{engine}.json", args)

    # Table columns in ENGINES order whatever the run order, so the ratio is always pagedserve / generate_batch.
    engines = [engine for engine in ENGINES if engine in engines]
    results = [BenchResult.from_json(runs[engine]["result"]) for engine in engines]
    payload: dict[str, Any] = {
        "date_utc": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(REPO_DIR),
        "machine": machine,
        "model": model_path,
        "command": " ".join(["python", "bench/engine_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "workload": {k: v for k, v in workload.to_json().items() if k != "prompts"},
        "results": [r.to_json() for r in results],
    }
    print()
    print(f"{workload.description}; {payload['date_utc']}; commit {payload['commit']}; {machine}")
    if len(results) >= 2:
        table = comparison_table(results)
        print(table)
        identical, differing = count_identical(runs[engines[0]]["token_ids"], runs[engines[1]]["token_ids"])
        pair = f"{engines[0]} vs {engines[1]}, greedy fp32"
        print(f"\ntoken-identical outputs ({pair}): {identical}/{identical + len(differing)}")
        if differing:
            print(f"differing request indices (first 20): {differing[:20]}")
        payload["table_markdown"] = table
        payload["token_identical_requests"] = identical
        payload["differing_request_indices"] = differing
    else:
        result = results[0]
        print(f"{result.engine}: {result.output_tokens_per_s:.1f} output tokens/s, wall {result.wall_s:.2f} s")
    for result in results:
        print(f"{result.engine} details: {json.dumps(result.details)}")
    write_json(args.results, payload)
    print(f"\nresults written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
