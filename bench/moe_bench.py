"""MoE throughput: the fused experts path (engine/kernels/moe/) vs transformers' experts code, and a per-layer
microbenchmark of the expert kernels (issue 30).

Model: the Qwen3-30B-A3B shape (48 layers, hidden 2048, 32 query heads and 4 KV heads of 128, 128 experts of
width 768, 8 active, vocabulary 151,936), random bf16 weights built on the GPU (about 57 GiB; no files).

Workloads (all submitted at once, greedy, EOS ignored):
  w64     64 requests, prompts 64..512, 128 new tokens
  w128    128 requests, prompts 64..512, 128 new tokens
  b1      one request alone, a 128-token prompt, 256 new tokens (also as a fraction of the active-weight bound)
  w1moe   W1 on the MoE shape: 512 requests, prompts 64..1024, 256 new tokens
Each runs on one engine per `--backends` value (EngineConfig.moe_backend: fused, transformers), and
transformers' `generate_batch` runs the `--baseline` workloads for the ratio. The microbenchmark times one
layer's experts at each `--tokens` count with every kernel (rows, triton, grouped_mm, the PyTorch reference)
and transformers' grouped_mm and eager experts, eagerly and replayed from a CUDA graph; `--tune` also times
alternative Triton tiles. A table is printed last; `--out` gets JSON after every stage (a run cut short keeps
what it measured).

    python bench/moe_bench.py --out moe.json                       # everything (about 8 minutes on an H200)
    python bench/moe_bench.py --layers 4 --workloads b1,w64 --baseline none   # quick smoke
    python bench/moe_bench.py --micro-only --tune                  # kernels only, with tile alternatives
    python bench/moe_bench.py --shape tiny                         # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult, RequestTiming, Workload, random_token_workload, summarize_timings  # noqa: E402

WORKLOADS = {  # name: (requests, min prompt, max prompt, new tokens)
    "w64": (64, 64, 512, 128),
    "w128": (128, 64, 512, 128),
    "b1": (1, 128, 128, 256),
    "w1moe": (512, 64, 1024, 256),
}
TOKEN_COUNTS = (1, 2, 4, 8, 16, 64, 512, 4096)


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    vocab_size: int


SHAPES = {
    "qwen3-30b-a3b": Shape(48, 2048, 32, 4, 128, 128, 8, 768, 151936),
    "tiny": Shape(2, 64, 4, 2, 16, 8, 2, 32, 512),  # a CPU check of this script
}


def moe_config_and_tokenizer(shape: Shape):
    """A Qwen3-MoE config of `shape` and a word-level tokenizer over its ids (no weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden, intermediate_size=6144,
        moe_intermediate_size=shape.moe_intermediate, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        num_experts=shape.num_experts, num_experts_per_tok=shape.top_k, norm_topk_prob=True,
        max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=False,
        bos_token_id=shape.vocab_size - 2, eos_token_id=shape.vocab_size - 1,
    )
    vocab = {f"w{i}": i for i in range(shape.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=f"w{shape.vocab_size - 1}",
                                        bos_token=f"w{shape.vocab_size - 2}")
    return config, tokenizer


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype):
    """Random weights drawn on the device in `dtype` (a float32 draw of 30B parameters would not fit)."""
    from transformers import AutoModelForCausalLM

    config, tokenizer = moe_config_and_tokenizer(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, tokenizer


def active_weight_bytes(shape: Shape, dtype_bytes: int = 2) -> int:
    """Bytes a one-token decode step reads: attention, router and the k active experts of every layer, the
    norms and the LM head (the embedding lookup reads one row)."""
    attention = shape.hidden * shape.head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    experts = shape.top_k * 3 * shape.hidden * shape.moe_intermediate
    per_layer = attention + shape.num_experts * shape.hidden + experts + 2 * shape.hidden + 2 * shape.head_dim
    return dtype_bytes * (shape.num_layers * per_layer + shape.vocab_size * shape.hidden + shape.hidden)


def copy_bandwidth_bytes_per_s(device: torch.device, num_bytes: int = 2 << 30) -> float | None:
    """Device-to-device copy bandwidth (read + write counted), the bound's yardstick; None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    return 2 * num_bytes * 10 / (start.elapsed_time(end) / 1000)


# ---- per-layer microbenchmark -----------------------------------------------------------------------------
def _time_us(fn, device: torch.device, graph: bool, iterations: int = 20) -> float | None:
    """Mean microseconds of `fn()`: eager launches, or replays of one CUDA graph (None if it cannot be captured)."""
    if device.type != "cuda":
        if graph:
            return None
        fn()
        started = time.perf_counter()
        for _ in range(2):  # off CUDA only the script itself is being checked
            fn()
        return (time.perf_counter() - started) / 2 * 1e6
    fn()
    torch.cuda.synchronize(device)
    if graph:
        try:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                fn()
        except Exception:  # noqa: BLE001 -- a host sync inside (the reference, transformers' eager loop)
            torch.cuda.synchronize(device)
            return None
        run = cuda_graph.replay
    else:
        run = fn
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1000 / iterations


def _transformers_experts(shape: Shape, w13: torch.Tensor, w2: torch.Tensor, implementation: str):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.moe_intermediate,
                            num_experts=shape.num_experts, num_experts_per_tok=shape.top_k)
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return module


def microbenchmark(shape: Shape, device: torch.device, dtype: torch.dtype, token_counts: tuple[int, ...],
                   tune: bool) -> list[dict[str, Any]]:
    """One layer's experts at each token count: microseconds per kernel, and the bytes of distinct experts read."""
    from pagedserve.engine.kernels.moe import triton as moe_triton
    from pagedserve.engine.kernels.moe.experts import KERNELS, MoeKernelPolicy, choose_kernel, run_kernel
    from pagedserve.engine.kernels.moe.grouped_mm import grouped_mm_unavailable

    generator = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(shape.num_experts, 2 * shape.moe_intermediate, shape.hidden, generator=generator,
                       device=device, dtype=dtype) * 0.02)
    w2 = torch.randn(shape.num_experts, shape.hidden, shape.moe_intermediate, generator=generator, device=device,
                     dtype=dtype) * 0.02
    modules = {name: _transformers_experts(shape, w13, w2, name) for name in ("grouped_mm", "eager")}
    expert_bytes = 3 * shape.hidden * shape.moe_intermediate * w13.element_size()
    rows = []
    for num_tokens in token_counts:
        x = torch.randn(num_tokens, shape.hidden, generator=generator, device=device, dtype=dtype)
        logits = torch.randn(num_tokens, shape.num_experts, generator=generator, device=device)
        weights, ids = torch.topk(logits.softmax(-1), shape.top_k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
        distinct = int(ids.unique().numel())
        row: dict[str, Any] = {"tokens": num_tokens, "distinct_experts": distinct,
                               "expert_bytes_read": distinct * expert_bytes,
                               "auto_kernel": choose_kernel(x, w13, w2, MoeKernelPolicy()), "us": {}}
        for kernel in KERNELS:
            if kernel == "reference" and num_tokens > 512 and device.type == "cuda":
                continue  # a Python loop over 128 experts: known slow, not a candidate
            if kernel != "reference" and (device.type != "cuda" or moe_triton.triton is None):
                continue  # off CUDA only the reference runs (the script's own check)
            if kernel == "grouped_mm" and grouped_mm_unavailable(x, w13, w2):
                continue
            if kernel == "rows" and num_tokens > 64:
                continue  # one program per pair: past a few tokens it rereads shared experts
            for graph in (False, kernel != "reference"):  # the reference syncs with the host: no capture
                fn = lambda kernel=kernel: run_kernel(kernel, x, ids, weights, w13, w2)  # noqa: E731
                row["us"][f"{kernel}{' graph' if graph else ''}"] = _time_us(fn, device, graph)
        for name, module in modules.items():
            if name == "eager" and num_tokens > 512 and device.type == "cuda":
                continue
            for graph in (False, name == "grouped_mm"):  # transformers' eager loop syncs with the host
                fn = lambda module=module: module(x, ids, weights)  # noqa: E731
                row["us"][f"transformers {name}{' graph' if graph else ''}"] = _time_us(fn, device, graph)
        if tune and device.type == "cuda" and moe_triton.triton is not None:
            row["tuning"] = tune_tiles(x, ids, weights, w13, w2, device)
        measured = {k: v for k, v in row["us"].items() if v is not None}
        row["fastest"] = min(measured, key=measured.get) if measured else None
        rows.append(row)
        print(f"microbench {num_tokens} tokens: " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()) + " us",
              flush=True)
    return rows


GROUPED_CANDIDATES = [(16, 64, 128, 1, 4, 3), (16, 128, 128, 1, 4, 3), (32, 64, 128, 4, 4, 3), (32, 128, 64, 4, 4, 4),
                      (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 3), (128, 64, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3)]
ROWS_CANDIDATES = [(4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3), (32, 256, 4, 2)]


def tune_tiles(x, ids, weights, w13, w2, device) -> dict[str, Any]:
    """Graph-replayed microseconds of alternative tiles: the grouped kernel's, and (few tokens) the per-pair
    kernel's, for both GEMMs at once (the same tiles for both)."""
    from pagedserve.engine.kernels.moe import triton as moe_triton

    timings: dict[str, float | None] = {}
    for candidate in GROUPED_CANDIDATES:
        config = moe_triton.GroupedConfig(*candidate)
        timings[f"triton {candidate}"] = _safe_time(
            lambda config=config: moe_triton.experts_triton(x, ids, weights, w13, w2, config), device)
    if x.shape[0] <= 64:
        for candidate in ROWS_CANDIDATES:
            config = moe_triton.RowsConfig(*candidate)
            timings[f"rows {candidate}"] = _safe_time(
                lambda config=config: moe_triton.experts_rows(x, ids, weights, w13, w2, (config, config)), device)
    measured = {k: v for k, v in timings.items() if v is not None}
    return {"us": timings, "best": min(measured, key=measured.get) if measured else None}


def _safe_time(fn, device) -> float | None:
    try:
        return _time_us(fn, device, graph=True)
    except Exception as error:  # noqa: BLE001 -- a tile that does not fit shared memory
        print(f"  tile failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}", flush=True)
        return None


# ---- engine workloads -------------------------------------------------------------------------------------
def run_engine_workloads(model, tokenizer, backend: str, workloads: dict[str, Workload], args,
                         on_result) -> None:
    """One engine with `moe_backend=backend` over every workload (a warm-up first), each result to `on_result`."""
    from gpu_bench import record_steps, step_time_summary

    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.engine.llm import LLM

    model.set_attn_implementation("sdpa")
    max_requests = max(w.num_requests for w in workloads.values())
    started = time.perf_counter()
    llm = LLM.from_model(model, tokenizer, served_name=f"moe-{backend}", moe_backend=backend,
                         max_num_seqs=max(max_requests, 2), enable_prefix_caching=False,
                         max_memory_percent=args.max_memory_percent, compile=args.compile)
    print(f"[{backend}] engine start {time.perf_counter() - started:.1f} s; {llm.engine.memory_plan.describe()}",
          flush=True)
    steps = record_steps(llm.engine)
    first = next(iter(workloads.values()))
    llm.generate([first.prompts[0][:128], first.prompts[-1][:16]],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    for name, workload in workloads.items():
        steps.clear()
        params = SamplingParams(temperature=0, max_tokens=workload.max_new_tokens, ignore_eos=True)
        _synchronize()
        started = time.perf_counter()
        outputs = llm.generate(workload.prompts, params, use_tqdm=False)
        _synchronize()
        wall_s = time.perf_counter() - started
        timings = [RequestTiming(o.metrics.arrival_time, o.metrics.first_token_time, o.metrics.last_token_time,
                                 len(o.outputs[0].token_ids)) for o in outputs]
        ttft, tpot = summarize_timings(timings)
        result = BenchResult(
            engine=f"pagedserve moe_backend={backend}", num_requests=len(outputs),
            num_prompt_tokens=workload.num_prompt_tokens,
            num_output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs), wall_s=wall_s, ttft_s=ttft,
            tpot_s=tpot, peak_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            memory_kind="torch.cuda max allocated",
            details={"workload": name, "largest_batch": max((s.num_seqs for s in steps), default=0),
                     "steps": step_time_summary(steps), "cuda_graphs": llm.engine.runner._decode_graphs is not None,
                     "compiled": bool(llm.engine.runner.is_compiled), "tokens": [o.outputs[0].token_ids[:32] for o in outputs[:4]]},
        )
        print(f"[{backend}] {name}: {result.output_tokens_per_s:.1f} output tok/s in {wall_s:.2f} s\n"
              f"{result.details['steps']}", flush=True)
        on_result(name, result)
    llm.engine.shutdown()  # the model back as it came (unswapped, uncompiled) for the next engine
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summary_table(payload: dict[str, Any]) -> str:
    """Markdown: one row per workload, output tok/s per engine, fused / transformers and fused / generate_batch."""
    results = payload["results"]
    engines = sorted({r["engine"] for rows in results.values() for r in rows})
    header = ["workload", *engines, "fused / transformers", "fused / generate_batch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, rows in results.items():
        by_engine = {r["engine"]: r["output_tokens_per_s"] for r in rows}
        fused = by_engine.get("pagedserve moe_backend=fused")
        hf = by_engine.get("pagedserve moe_backend=transformers")
        baseline = by_engine.get("generate_batch")
        cells = [f"{by_engine[e]:.1f}" if e in by_engine else "" for e in engines]
        lines.append("| " + " | ".join([name, *cells, _ratio(fused, hf), _ratio(fused, baseline)]) + " |")
    for name, rows in results.items():
        tokens = {r["engine"]: r.get("details", {}).get("tokens") for r in rows}
        fused, hf = tokens.get("pagedserve moe_backend=fused"), tokens.get("pagedserve moe_backend=transformers")
        if fused and hf:
            equal = sum(a == b for a, b in zip(fused, hf))
            lines.append(f"{name}: first 32 greedy tokens of the first {len(fused)} requests equal on both paths: "
                         f"{equal}/{len(fused)} (bf16: a near tie may part them)")
    bound = payload.get("batch1_bound_tokens_per_s")
    if bound:
        b1 = {r["engine"]: r["output_tokens_per_s"] for r in results.get("b1", [])}
        parts = [f"{engine}: {value / bound:.2f}" for engine, value in b1.items()]
        lines.append(f"\nbatch 1 as a share of the active-weight bound ({bound:.0f} tok/s at "
                     f"{payload['copy_bandwidth_gb_s']:.0f} GB/s copy bandwidth): " + ", ".join(parts))
    for row in payload.get("microbench", []):
        measured = {k: v for k, v in row["us"].items() if v is not None}
        best = row["fastest"]
        lines.append(f"layer at {row['tokens']} tokens ({row['distinct_experts']} experts): fastest {best} "
                     f"{measured.get(best, float('nan')):.1f} us; auto picks {row['auto_kernel']}; "
                     + ", ".join(f"{k} {v:.1f}" for k, v in measured.items() if k.endswith("graph")))
        if row.get("tuning", {}).get("best"):
            lines.append(f"  tiles: best {row['tuning']['best']} {row['tuning']['us'][row['tuning']['best']]:.1f} us")
    return "\n".join(lines)


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers for a quick smoke")
    parser.add_argument("--workloads", default="w64,w128,b1,w1moe", help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--backends", default="fused,transformers", help="EngineConfig.moe_backend values to run")
    parser.add_argument("--baseline", default="w128", help="workloads also run with generate_batch ('none': none)")
    parser.add_argument("--requests-scale", type=float, default=1.0,
                        help="scale every workload's request count (smoke runs)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap every workload's new tokens (smoke runs)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKEN_COUNTS)), help="microbenchmark token counts")
    parser.add_argument("--micro-only", action="store_true", help="only the per-layer microbenchmark")
    parser.add_argument("--no-micro", action="store_true", help="skip the per-layer microbenchmark")
    parser.add_argument("--tune", action="store_true", help="also time alternative Triton tiles per token count")
    parser.add_argument("--max-memory-percent", type=float, default=0.9)
    parser.add_argument("--compile", dest="compile", action="store_const", const=True, default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    shape = SHAPES[args.shape]
    if args.layers is not None:
        shape = Shape(args.layers, *[getattr(shape, f) for f in Shape.__dataclass_fields__][1:])
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    bandwidth = copy_bandwidth_bytes_per_s(device)
    # The copy figure counts read and write traffic, the yardstick the 650 tok/s bound used.
    bound = bandwidth / active_weight_bytes(shape) if bandwidth else None
    payload: dict[str, Any] = {
        "shape": shape.__dict__, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "copy_bandwidth_gb_s": bandwidth and bandwidth / 1e9, "active_weight_bytes": active_weight_bytes(shape),
        "batch1_bound_tokens_per_s": bound, "results": {}, "microbench": [],
    }

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload, indent=2, default=str))

    if not args.no_micro:
        payload["microbench"] = microbenchmark(shape, device, dtype, tuple(int(t) for t in args.tokens.split(",")),
                                               args.tune)
        save()
    if not args.micro_only:
        model, tokenizer = build_model(shape, device, dtype)
        print(f"model built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
              f"{torch.cuda.memory_allocated() / 2**30 if args.device == 'cuda' else 0:.1f} GiB", flush=True)
        workloads = {}
        for name in args.workloads.split(","):
            requests, low, high, new = WORKLOADS[name]
            requests = max(1, round(requests * args.requests_scale))
            new = min(new, args.max_new_tokens or new)
            workloads[name] = random_token_workload(requests, low, high, new, vocab_size=shape.vocab_size - 2, seed=0)

        def record(name: str, result: BenchResult) -> None:
            payload["results"].setdefault(name, []).append(result.to_json())
            save()

        for backend in args.backends.split(","):
            run_engine_workloads(model, tokenizer, backend, workloads, args, record)
        baseline_names = [] if args.baseline == "none" else [n for n in args.baseline.split(",") if n in workloads]
        if baseline_names and args.device != "cuda":
            print("generate_batch baselines skipped: they run on a GPU only", flush=True)
        elif baseline_names:
            from gpu_bench import run_generate_batch

            for name in baseline_names:
                model.set_attn_implementation("sdpa")
                record(name, run_generate_batch(model, workloads[name]))
                print(f"generate_batch {name}: {payload['results'][name][-1]['output_tokens_per_s']:.1f} output tok/s",
                      flush=True)
    save()
    print()
    print(f"device: {payload['device']}; shape: {args.shape}, {shape.num_layers} layers")
    print(summary_table(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
