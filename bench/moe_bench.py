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
and transformers' grouped_mm and eager experts, eagerly and replayed from a CUDA graph, cycling through 8
routings so that each call reads other experts (as each layer reads its own weights: no L2 reuse); `--tune`
also times alternative Triton tiles: each per-pair GEMM's candidates alone up to 8 tokens (the best printed as
a ROWS_TILES table to paste), the grouped kernel's above. `--profile` runs torch.profiler over batch-1 decode
steps of the engine instead: kernels per step, one decoder layer kernel by kernel (experts against the rest)
and the step extrapolated to the shape's 48 layers. A table is printed last; `--out` gets JSON after every
stage (a run cut short keeps what it measured).

`--quantization fp8` runs everything with FP8 weights (engine/kernels/moe/fp8.py, fp8_linear.py): the model's
linears and experts quantized in place after it is built (what `quantization="fp8"` does at load), the fused
backend only (transformers' expert code cannot run e4m3 experts; no generate_batch baseline); the
microbenchmark quantizes its layer's experts (rows W8A16, triton/grouped_mm W8A8). `--quantization none,fp8`
runs the bf16 passes first, then quantizes the same model and runs the FP8 ones (same process, same weights).

    python bench/moe_bench.py --out moe.json                       # everything (about 8 minutes on an H200)
    python bench/moe_bench.py --layers 4 --workloads b1,w64 --baseline none   # quick smoke
    python bench/moe_bench.py --micro-only --tune                  # kernels only, with tile alternatives
    python bench/moe_bench.py --micro-only --tune --tokens 1,2,4,8 --micro-kernels rows   # the per-pair tiles
    python bench/moe_bench.py --profile --layers 8                 # where a batch-1 step's time goes
    python bench/moe_bench.py --shape tiny                         # CPU check of the script itself
    python bench/moe_bench.py --quantization none,fp8 --workloads b1,w128 --baseline none   # bf16 vs FP8 experts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BenchResult, RequestTiming, Workload, device_events, kernel_table,  # noqa: E402
                    random_token_workload, release_memory, summarize_timings)

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


def active_weight_bytes(shape: Shape, dtype_bytes: int = 2, fp8: bool = False) -> int:
    """Bytes a one-token decode step reads: attention, router and the k active experts of every layer, the
    norms and the LM head (the embedding lookup reads one row). `fp8`: attention and experts at one byte a
    weight (their row scales are negligible), the router, norms and LM head in `dtype_bytes`."""
    attention = shape.hidden * shape.head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    experts = shape.top_k * 3 * shape.hidden * shape.moe_intermediate
    quantized_bytes = 1 if fp8 else dtype_bytes
    per_layer = (quantized_bytes * (attention + experts)
                 + dtype_bytes * (shape.num_experts * shape.hidden + 2 * shape.hidden + 2 * shape.head_dim))
    return shape.num_layers * per_layer + dtype_bytes * (shape.vocab_size * shape.hidden + shape.hidden)


def quantize_model_fp8(model) -> None:
    """What quantization='fp8' does at load, on a model already built: every linear but the LM head to
    `Fp8Linear`, the fused path's experts to e4m3 with row scales, in place."""
    from pagedserve.engine.kernels.fp8_linear import quantize_linears
    from pagedserve.engine.kernels.moe.experts import quantize_experts

    started = time.perf_counter()
    linears, experts = quantize_linears(model), quantize_experts(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"quantized to FP8 in {time.perf_counter() - started:.1f} s: {linears} linear layers, the experts of {experts} "
          f"blocks; {torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.1f} GiB", flush=True)


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
ROUTINGS = 8  # routings cycled through per token count: each call reads other experts, as each layer reads its own


def _time_us(fns, device: torch.device, graph: bool, iterations: int = 20) -> float | None:
    """Mean microseconds of one call of `fns` (callables run in turn, one round per iteration): eager launches,
    or replays of one CUDA graph of a round (None if it cannot be captured). Calls that read other weights in
    turn keep the timing from reading them from L2, which a decode step does not."""
    if device.type != "cuda":
        if graph:
            return None
        for fn in fns:
            fn()
        started = time.perf_counter()
        for fn in fns:  # off CUDA only the script itself is being checked
            fn()
        return (time.perf_counter() - started) / len(fns) * 1e6
    for fn in fns:
        fn()
    torch.cuda.synchronize(device)
    if graph:
        try:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                for fn in fns:
                    fn()
        except Exception:  # noqa: BLE001 -- a host sync inside (the reference, transformers' eager loop)
            torch.cuda.synchronize(device)
            return None
        rounds = [cuda_graph.replay]
    else:
        rounds = fns
    for run in rounds:
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        for run in rounds:
            run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1000 / (iterations * len(fns))


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


def random_routings(num_tokens: int, shape: Shape, generator: torch.Generator, device: torch.device,
                    dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ROUTINGS (ids, weights) of `num_tokens` tokens: softmax top-k of random logits, renormalized (Qwen3's)."""
    routings = []
    for _ in range(ROUTINGS if device.type == "cuda" else 2):  # off CUDA only the script itself is being checked
        logits = torch.randn(num_tokens, shape.num_experts, generator=generator, device=device)
        weights, ids = torch.topk(logits.softmax(-1), shape.top_k)
        routings.append((ids, (weights / weights.sum(-1, keepdim=True)).to(dtype)))
    return routings


MICRO_KERNELS = ("rows", "triton", "grouped_mm", "reference", "transformers")


def microbenchmark(shape: Shape, device: torch.device, dtype: torch.dtype, token_counts: tuple[int, ...],
                   tune: bool, kernels: tuple[str, ...] = MICRO_KERNELS, fp8: bool = False) -> list[dict[str, Any]]:
    """One layer's experts at each token count: microseconds per call of each of `kernels` (ROUTINGS routings
    in turn), the mean bytes of distinct experts a call reads, and (`tune`) the tile candidates' times. `fp8`:
    the experts in e4m3 with row scales (transformers' experts code cannot run them: not timed)."""
    from pagedserve.engine.kernels.moe import triton as moe_triton
    from pagedserve.engine.kernels.moe.experts import (
        KERNELS,
        ROWS_MAX_TOKENS,
        MoeKernelPolicy,
        choose_kernel,
        run_kernel,
    )
    from pagedserve.engine.kernels.moe.grouped_mm import grouped_mm_unavailable

    generator = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(shape.num_experts, 2 * shape.moe_intermediate, shape.hidden, generator=generator,
                       device=device, dtype=dtype) * 0.02)
    w2 = torch.randn(shape.num_experts, shape.hidden, shape.moe_intermediate, generator=generator, device=device,
                     dtype=dtype) * 0.02
    scales: dict[str, torch.Tensor] = {}
    if fp8:
        from pagedserve.engine.kernels.moe.fp8 import quantize_expert_weight

        (w13, scales["w13_scale"]), (w2, scales["w2_scale"]) = quantize_expert_weight(w13), quantize_expert_weight(w2)
    modules = ({name: _transformers_experts(shape, w13, w2, name) for name in ("grouped_mm", "eager")}
               if "transformers" in kernels and not fp8 else {})
    expert_bytes = 3 * shape.hidden * shape.moe_intermediate * w13.element_size()
    on_gpu = device.type == "cuda" and moe_triton.triton is not None
    rows = []
    for num_tokens in token_counts:
        x = torch.randn(num_tokens, shape.hidden, generator=generator, device=device, dtype=dtype)
        routings = random_routings(num_tokens, shape, generator, device, dtype)
        distinct = sum(int(ids.unique().numel()) for ids, _ in routings) / len(routings)
        row: dict[str, Any] = {"tokens": num_tokens, "distinct_experts": distinct,
                               "expert_bytes_read": distinct * expert_bytes,
                               "auto_kernel": choose_kernel(x, w13, w2, MoeKernelPolicy()), "us": {}}
        for kernel in KERNELS:
            if kernel not in kernels:
                continue
            if kernel == "reference" and num_tokens > 512 and device.type == "cuda":
                continue  # a Python loop over 128 experts: known slow, not a candidate
            if kernel != "reference" and not on_gpu:
                continue  # off CUDA only the reference runs (the script's own check)
            if kernel == "grouped_mm" and grouped_mm_unavailable(x, w13, w2):
                continue
            if kernel == "rows" and num_tokens > 64:
                continue  # one program per pair: past a few tokens it rereads shared experts
            fns = [lambda kernel=kernel, ids=ids, weights=weights: run_kernel(kernel, x, ids, weights, w13, w2,
                                                                              **scales)
                   for ids, weights in routings]
            for graph in (False, kernel != "reference"):  # the reference syncs with the host: no capture
                row["us"][f"{kernel}{' graph' if graph else ''}"] = _time_us(fns, device, graph)
        for name, module in modules.items():
            if name == "eager" and num_tokens > 512 and device.type == "cuda":
                continue
            fns = [lambda module=module, ids=ids, weights=weights: module(x, ids, weights) for ids, weights in routings]
            for graph in (False, name == "grouped_mm"):  # transformers' eager loop syncs with the host
                row["us"][f"transformers {name}{' graph' if graph else ''}"] = _time_us(fns, device, graph)
        if tune and on_gpu and num_tokens <= ROWS_MAX_TOKENS:
            row["rows_tuning"] = tune_rows(x, routings, w13, w2, device, expert_bytes, **scales)
        elif tune and on_gpu:
            row["tuning"] = tune_grouped(x, routings, w13, w2, device, **scales)
        measured = {k: v for k, v in row["us"].items() if v is not None}
        row["fastest"] = min(measured, key=measured.get) if measured else None
        rows.append(row)
        rates = "".join(f"; {k} reads {row['expert_bytes_read'] / v / 1e6:.2f} TB/s" for k, v in measured.items()
                        if k == "rows graph")
        print(f"microbench {num_tokens} tokens ({distinct:.1f} experts, {row['expert_bytes_read'] / 1e6:.1f} MB): "
              + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()) + f" us{rates}", flush=True)
    return rows


GROUPED_CANDIDATES = [(16, 64, 128, 1, 4, 3), (16, 128, 128, 1, 4, 3), (32, 64, 128, 4, 4, 3), (32, 128, 64, 4, 4, 4),
                      (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 3), (128, 64, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3)]
# Per-pair tiles (block_n, block_k, num_warps, num_stages). GEMM 1: gate + up rows of one pair, K = H (2048);
# GEMM 2: k slots x block_n rows of one token, K = I (768: 256 and 128 divide it, 512 leaves a masked step).
ROWS_GATE_UP_CANDIDATES = [(4, 1024, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 3), (8, 1024, 8, 3),
                           (16, 256, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3)]
# FP8 weights: a step of the same bytes is twice as deep (the one-row FP8 GEMM's best steps were 2,048 deep).
ROWS_GATE_UP_CANDIDATES_FP8 = [(4, 2048, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 3), (8, 2048, 4, 3), (8, 2048, 8, 3),
                               (16, 1024, 8, 3), (16, 512, 4, 3), (32, 512, 8, 3)]
ROWS_DOWN_CANDIDATES = [(2, 256, 4, 3), (4, 128, 4, 3), (4, 256, 4, 3), (4, 256, 8, 3), (8, 128, 4, 3),
                        (8, 256, 8, 3), (2, 512, 4, 3), (16, 64, 4, 3)]


def tune_grouped(x, routings, w13, w2, device, **scales: torch.Tensor) -> dict[str, Any]:
    """Graph-replayed microseconds of the grouped kernel's alternative tiles (the same tiles for both GEMMs)."""
    from pagedserve.engine.kernels.moe import triton as moe_triton

    timings: dict[str, float | None] = {}
    for candidate in GROUPED_CANDIDATES:
        config = moe_triton.GroupedConfig(*candidate)
        fns = [lambda config=config, ids=ids, weights=weights: moe_triton.experts_triton(
            x, ids, weights, w13, w2, config, **scales) for ids, weights in routings]
        timings[f"triton {candidate}"] = _safe_time(fns, device)
    measured = {k: v for k, v in timings.items() if v is not None}
    return {"us": timings, "best": min(measured, key=measured.get) if measured else None}


def tune_rows(x, routings, w13, w2, device, expert_bytes: int, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> dict[str, Any]:
    """Each per-pair GEMM alone over its tile candidates (graph replays, routings in turn), each candidate's
    output checked against the default tiles' (a wrong one is reported, not ranked); then the whole op with the
    best pair of tiles, with and without programmatic dependent launch. With scales: FP8 experts, its own
    candidates for GEMM 1, the best printed for ROWS_TILES_FP8."""
    from pagedserve.engine.kernels.launch import supports_programmatic_launch
    from pagedserve.engine.kernels.moe import triton as moe_triton
    from pagedserve.engine.kernels.moe.reference import experts_reference

    num_tokens, top_k = x.shape[0], routings[0][0].shape[1]
    intermediate = w2.shape[2]
    stream = num_tokens == 1
    flat = [(ids.reshape(-1).contiguous(), weights.reshape(-1).contiguous()) for ids, weights in routings]
    acts = [torch.empty(num_tokens * top_k, intermediate, dtype=x.dtype, device=device) for _ in flat]
    out = torch.empty_like(x)
    is_fp8 = w13_scale is not None
    default = moe_triton.rows_tiles(num_tokens, fp8=is_fp8)
    gate_up_candidates = ROWS_GATE_UP_CANDIDATES_FP8 if is_fp8 else ROWS_GATE_UP_CANDIDATES
    for (ids, _), act in zip(flat, acts):  # the down candidates read these
        moe_triton.gate_up_rows(x, w13, act, ids, top_k, default.gate_up, stream_weights=stream, w13_scale=w13_scale)
    ids0, weights0 = routings[0]
    if is_fp8:
        want_out = experts_reference(x.float(), ids0, weights0, w13, w2, w13_scale, w2_scale)
    else:
        want_out = experts_reference(x.float(), ids0, weights0, w13.float(), w2.float())
    want_act = acts[0].float().clone()

    def error(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    distinct = [int(ids.unique().numel()) for ids, _ in routings]
    gate_up_bytes = sum(distinct) / len(distinct) * expert_bytes * 2 / 3
    result: dict[str, Any] = {"gate_up_us": {}, "down_us": {}, "wrong": []}
    candidates = {"gate_up": {str(c): c for c in gate_up_candidates},
                  "down": {str(c): c for c in ROWS_DOWN_CANDIDATES}}
    for candidate in gate_up_candidates:
        config = moe_triton.RowsConfig(*candidate)
        scratch = torch.empty_like(acts[0])
        fns = [lambda config=config, ids=ids: moe_triton.gate_up_rows(x, w13, scratch, ids, top_k, config,
                                                                       stream_weights=stream, w13_scale=w13_scale)
               for ids, _ in flat]
        us = _safe_time(fns, device)
        moe_triton.gate_up_rows(x, w13, scratch, flat[0][0], top_k, config, stream_weights=stream, w13_scale=w13_scale)
        if us is not None and error(scratch, want_act) > 2e-2:
            result["wrong"].append(f"gate_up {candidate}: error {error(scratch, want_act):.3g}")
            us = None
        result["gate_up_us"][str(candidate)] = us
    for candidate in ROWS_DOWN_CANDIDATES:
        config = moe_triton.RowsConfig(*candidate)
        fns = [lambda config=config, act=act, ids=ids, weights=weights: moe_triton.down_rows(
            act, w2, out, ids, weights, top_k, config, stream_weights=stream, w2_scale=w2_scale)
            for act, (ids, weights) in zip(acts, flat)]
        us = _safe_time(fns, device)
        moe_triton.down_rows(acts[0], w2, out, *flat[0], top_k, config, stream_weights=stream, w2_scale=w2_scale)
        if us is not None and error(out, want_out) > 2e-2:
            result["wrong"].append(f"down {candidate}: error {error(out, want_out):.3g}")
            us = None
        result["down_us"][str(candidate)] = us
    best = {}
    for gemm in ("gate_up", "down"):
        measured = {k: v for k, v in result[f"{gemm}_us"].items() if v is not None}
        best[gemm] = min(measured, key=measured.get) if measured else None
    result["best"] = best
    if best["gate_up"] and best["down"]:
        tiles = moe_triton.RowsTiles(moe_triton.RowsConfig(*candidates["gate_up"][best["gate_up"]]),
                                     moe_triton.RowsConfig(*candidates["down"][best["down"]]))
        result["best_tiles"] = tiles
        for use_pdl in (False, True):
            if use_pdl and not supports_programmatic_launch(device):
                continue
            fns = [lambda ids=ids, weights=weights, use_pdl=use_pdl: moe_triton.experts_rows(
                x, ids, weights, w13, w2, tiles, use_pdl=use_pdl, w13_scale=w13_scale, w2_scale=w2_scale)
                for ids, weights in routings]
            result[f"op_us{' pdl' if use_pdl else ''}"] = _safe_time(fns, device)
    bytes_read = sum(distinct) / len(distinct) * expert_bytes
    gate_up_us = result["gate_up_us"].get(best["gate_up"]) if best["gate_up"] else None
    down_us = result["down_us"].get(best["down"]) if best["down"] else None
    text = f"rows tiles at {num_tokens} tokens ({bytes_read / 1e6:.1f} MB of experts):"
    if gate_up_us:
        text += f" gate_up best {best['gate_up']} {gate_up_us:.1f} us ({gate_up_bytes / gate_up_us / 1e6:.2f} TB/s)"
    if down_us:
        text += f", down best {best['down']} {down_us:.1f} us ({(bytes_read - gate_up_bytes) / down_us / 1e6:.2f} TB/s)"
    for key in ("op_us", "op_us pdl"):
        if result.get(key):
            text += (f"; whole op{' with PDL' if 'pdl' in key else ''} {result[key]:.1f} us "
                     f"({bytes_read / result[key] / 1e6:.2f} TB/s)")
    print(text, flush=True)
    for gemm in ("gate_up", "down"):
        timings = result[f"{gemm}_us"].items()
        print(f"  {gemm}: " + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in timings), flush=True)
    for line in result["wrong"]:
        print(f"  WRONG OUTPUT, not ranked: {line}", flush=True)
    return result


def rows_tiles_table(rows: list[dict[str, Any]], fp8: bool = False) -> str | None:
    """engine/kernels/moe/triton.py's ROWS_TILES (ROWS_TILES_FP8) from a tune's best tiles per token count (to
    paste)."""
    entries = [(row["tokens"], row["rows_tuning"].get("best_tiles")) for row in rows
               if row.get("rows_tuning", {}).get("best_tiles") and bool(row.get("fp8")) == fp8]
    if not entries:
        return None
    lines = [f"ROWS_TILES{'_FP8' if fp8 else ''}: tuple[tuple[int, RowsTiles], ...] = ("]
    for tokens, tiles in sorted(entries):
        lines.append(f"    ({tokens}, RowsTiles(gate_up=RowsConfig{astuple(tiles.gate_up)}, "
                     f"down=RowsConfig{astuple(tiles.down)})),")
    return "\n".join(lines + [")"])


def _safe_time(fns, device) -> float | None:
    try:
        return _time_us(fns, device, graph=True)
    except Exception as error:  # noqa: BLE001 -- a tile that does not fit shared memory
        print(f"  tile failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}", flush=True)
        return None


# ---- engine workloads -------------------------------------------------------------------------------------
def run_engine_workloads(model, tokenizer, backend: str, workloads: dict[str, Workload], args,
                         on_result, label: str = "") -> None:
    """One engine with `moe_backend=backend` over every workload (a warm-up first), each result to `on_result`.
    `label` (" fp8") names the weights in the results."""
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
            engine=f"pagedserve moe_backend={backend}{label}", num_requests=len(outputs),
            num_prompt_tokens=workload.num_prompt_tokens,
            num_output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs), wall_s=wall_s, ttft_s=ttft,
            tpot_s=tpot, peak_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            memory_kind="torch.cuda max allocated",
            details={"workload": name, "largest_batch": max((s.num_seqs for s in steps), default=0),
                     "steps": step_time_summary(steps), "cuda_graphs": llm.engine.runner._decode_graphs is not None,
                     "compiled": bool(llm.engine.runner.is_compiled), "tokens": [o.outputs[0].token_ids[:32] for o in outputs[:4]]},
        )
        print(f"[{backend}{label}] {name}: {result.output_tokens_per_s:.1f} output tok/s in {wall_s:.2f} s\n"
              f"{result.details['steps']}", flush=True)
        on_result(name, result)
    llm.engine.shutdown()  # the model back as it came (unswapped, uncompiled) for the next engine
    del llm
    release_memory()


# ---- batch-1 profile ----------------------------------------------------------------------------------------
def expert_kernel_names() -> set[str]:
    """The names the fused experts' Triton kernels run under on the device (a kernel is named after its function)."""
    from pagedserve.engine.kernels.moe import triton as moe_triton

    if moe_triton.triton is None:
        return set()
    kernels = (moe_triton._gate_up_rows_kernel, moe_triton._down_rows_kernel, moe_triton._grouped_kernel)
    return {kernel.fn.__name__ for kernel in kernels}


def layer_breakdown(events: list[tuple[float, float, str]], expert_names: set[str]) -> dict[str, Any] | None:
    """The decoder layer as the device ran it. The stream is cut after each layer's last expert kernel; the
    commonest sequence of kernel names between two cuts is one layer (from the residual add after one layer's
    experts through the next layer's experts); the others cross a step boundary (final norm, LM head, sampling,
    the next step's inputs, host gaps, then the first layer). A layer's time is the time between its cut and
    the one before; its experts' time runs from the end of the kernel before them (or their start, if later) to
    their end, so a kernel started early by programmatic dependent launch is not counted twice."""
    cuts = [i for i, (_, _, name) in enumerate(events)
            if name in expert_names and (i + 1 == len(events) or events[i + 1][2] not in expert_names)]
    if len(cuts) < 3:
        return None
    segments = [(events[a + 1: b + 1], events[b][1] - events[a][1], events[a][1]) for a, b in zip(cuts, cuts[1:])]
    signatures = Counter(tuple(name for _, _, name in segment) for segment, _, _ in segments)
    layer_names, num_layer_segments = signatures.most_common(1)[0]
    layers = [(segment, period, previous_end) for segment, period, previous_end in segments
              if tuple(name for _, _, name in segment) == layer_names]
    first_expert = next(i for i, name in enumerate(layer_names) if name in expert_names)
    durations = [[end - start for start, end, _ in segment] for segment, _, _ in layers]
    gaps = [[segment[0][0] - previous_end] + [segment[i][0] - segment[i - 1][1] for i in range(1, len(segment))]
            for segment, _, previous_end in layers]
    experts = [segment[-1][1] - max(segment[first_expert][0],
                                    segment[first_expert - 1][1] if first_expert else previous_end)
               for segment, _, previous_end in layers]
    layer_us = sum(period for _, period, _ in layers) / len(layers)
    crossing = [period for segment, period, _ in segments if tuple(name for _, _, name in segment) != layer_names]
    return {
        "layers_averaged": len(layers), "other_segments": len(crossing),
        "layer_us": layer_us, "experts_us": sum(experts) / len(experts),
        "kernels": [{"name": name, "mean_us": sum(d[i] for d in durations) / len(durations),
                     "gap_before_us": sum(g[i] for g in gaps) / len(gaps), "is_expert": name in expert_names}
                    for i, name in enumerate(layer_names)],
        # A step-crossing segment holds one layer plus what runs outside the layers.
        "outside_layers_us": (sum(crossing) / len(crossing) - layer_us) if crossing else None,
    }


def _short(name: str, width: int = 78) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def print_profile(events: list[tuple[float, float, str]], busy_us: float, num_steps: int, step_ms: float,
                  num_layers: int, full_layers: int, title: str) -> dict[str, Any]:
    """The per-kernel table, the layer breakdown and the step's extrapolation to `full_layers` layers
    (`busy_us`: a step's device busy time, the union of its kernels' spans)."""
    table = kernel_table(events, num_steps)
    kernel_us = sum(row["us_per_step"] for row in table)
    print(f"\n=== {title}: {num_steps} batch-1 decode steps, {num_layers} layers ===")
    print(f"step: {step_ms:.3f} ms wall (timed without the profiler); device busy {busy_us / 1000:.3f} ms a step, "
          f"{len(events) / num_steps:.0f} kernels a step, their times summed {kernel_us / 1000:.3f} ms")
    print("| kernel | calls/step | us/step | share | us/call |")
    print("|---|---:|---:|---:|---:|")
    for row in table[:30]:
        print(f"| {_short(row['name'])} | {row['per_step']:.1f} | {row['us_per_step']:.1f} | {row['share']:.1%} | "
              f"{row['mean_us']:.2f} |")
    if len(table) > 30:
        rest = table[30:]
        print(f"| ({len(rest)} other names) | {sum(r['per_step'] for r in rest):.1f} | "
              f"{sum(r['us_per_step'] for r in rest):.1f} | {sum(r['share'] for r in rest):.1%} | |")
    layer = layer_breakdown(events, expert_kernel_names())
    result: dict[str, Any] = {"title": title, "steps": num_steps, "step_ms": step_ms, "busy_us_per_step": busy_us,
                              "kernels_per_step": len(events) / num_steps, "table": table, "layer": layer}
    if layer is None:
        print("no layer breakdown: no fused expert kernels in the stream (moe_backend=transformers, or the profiler "
              f"saw no graph kernels); per layer on average, all kernels: {kernel_us / num_layers:.1f} us")
        return result
    rest_us = layer["layer_us"] - layer["experts_us"]
    num_rest = sum(not k["is_expert"] for k in layer["kernels"])
    print(f"\none decoder layer (mean of {layer['layers_averaged']}): {layer['layer_us']:.1f} us = experts "
          f"{layer['experts_us']:.1f} us ({sum(k['is_expert'] for k in layer['kernels'])} kernels) + the rest "
          f"{rest_us:.1f} us ({num_rest} kernels: attention, router, norms, residuals, and the gaps between them)")
    print("| # | kernel (in order) | us | gap before, us |")
    print("|---:|---|---:|---:|")
    for i, kernel in enumerate(layer["kernels"], 1):
        print(f"| {i} | {'[experts] ' if kernel['is_expert'] else ''}{_short(kernel['name'])} | "
              f"{kernel['mean_us']:.2f} | {kernel['gap_before_us']:.2f} |")
    outside = layer["outside_layers_us"]
    if outside is not None:
        full_ms = (outside + full_layers * layer["layer_us"]) / 1000
        print(f"outside the layers (final norm, LM head, sampling, the next step's inputs, host gaps): "
              f"{outside:.1f} us a step; with {full_layers} layers a step would take about {full_ms:.2f} ms "
              f"({1000 / full_ms:.0f} tok/s), "
              f"{full_layers * layer['experts_us'] / 1000:.2f} ms of it experts and "
              f"{full_layers * rest_us / 1000:.2f} ms the rest of the layers")
        result["full_layers_step_ms"] = full_ms
    return result


def profile_batch1(model, tokenizer, backend: str, shape: Shape, args) -> list[dict[str, Any]]:
    """One engine (CUDA graphs on, as `b1` runs) decoding one 128-token request: `--profile-steps` steps timed,
    then the same number under torch.profiler. If the profiler saw the graphs' kernels (at least two a layer a
    step), that is the profile; if not, the steps are profiled again with the graphs set aside (the compiled
    layers launched one by one, host gaps included) and the output says so."""
    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.engine.llm import LLM

    model.set_attn_implementation("sdpa")
    started = time.perf_counter()
    llm = LLM.from_model(model, tokenizer, served_name=f"moe-{backend}", moe_backend=backend, max_num_seqs=2,
                         enable_prefix_caching=False, max_memory_percent=args.max_memory_percent, compile=args.compile)
    engine = llm.engine
    print(f"[{backend}] engine start {time.perf_counter() - started:.1f} s; CUDA graphs: "
          f"{engine.runner._decode_graphs is not None}; compiled: {bool(engine.runner.is_compiled)}", flush=True)
    num_steps = args.profile_steps
    params = SamplingParams(temperature=0, max_tokens=4 * num_steps + 20, ignore_eos=True)
    engine.add_request("profile", [(1000 + i) % (shape.vocab_size - 2) for i in range(128)], params)
    while engine.scheduler.waiting or any(not r.is_prefill_done for r in engine.scheduler.running):
        engine.step()
    def step_ms_after(warmup_steps: int) -> float:
        """The mean wall time of `num_steps` steps after `warmup_steps` untimed ones, in ms."""
        for _ in range(warmup_steps):
            engine.step()
        _synchronize()
        started = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        _synchronize()
        return (time.perf_counter() - started) / num_steps * 1000

    step_ms = step_ms_after(5)

    def profiled() -> tuple[list[tuple[float, float, str]], float]:
        from profile_step import gpu_busy_us

        activities = torch.profiler.ProfilerActivity
        activity = activities.CUDA if torch.cuda.is_available() else activities.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(num_steps):
                engine.step()
            _synchronize()
        return device_events(prof), gpu_busy_us(prof) / num_steps

    full_layers = SHAPES[args.shape].num_layers
    results = []
    events, busy_us = profiled()
    graphs = engine.runner._decode_graphs is not None
    title = f"moe_backend={backend}, CUDA graphs {'on' if graphs else 'off'}"
    # The graphs' kernels were seen if every layer's experts were (fused), or five kernels a layer (transformers').
    expert_names = expert_kernel_names()
    if backend == "fused" and expert_names and torch.cuda.is_available():
        seen = sum(name in expert_names for _, _, name in events) >= shape.num_layers * num_steps
    else:
        seen = len(events) >= 5 * shape.num_layers * num_steps
    if seen or not graphs:
        results.append(print_profile(events, busy_us, num_steps, step_ms, shape.num_layers, full_layers, title))
    else:
        print(f"\nthe profiler saw {len(events) / num_steps:.1f} device events a step with CUDA graphs on, not every "
              f"layer's kernels: it did not see the graphs' kernels. Profiling the same steps with the graphs set aside "
              f"(the compiled layers launched one by one: kernel times hold, gaps and the step time include the "
              f"host's launches)", flush=True)
        saved, engine.runner._decode_graphs = engine.runner._decode_graphs, None
        try:
            eager_ms = step_ms_after(3)
            results.append(print_profile(*profiled(), num_steps, eager_ms, shape.num_layers, full_layers,
                                         f"moe_backend={backend}, CUDA graphs set aside (the graphed step: "
                                         f"{step_ms:.3f} ms wall)"))
        finally:
            engine.runner._decode_graphs = saved
    engine.abort("profile")
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()  # the model back as it came for the next engine
    del llm
    engine = None  # the helpers above share this name: emptied, so the engine can be collected now
    release_memory()
    return results


@contextlib.contextmanager
def moe_switched_beforehand(model, backend: str, args):
    """For the fused backend with `--transformers-router` or `--moe-pdl`: the MoE blocks switched before the
    engine starts (experts without their routers, or experts and routers launched with programmatic dependent
    launch), so the engine's own switch leaves them as they are: A/B runs of the one-kernel router and of PDL
    without an engine setting for either; undone after."""
    if backend != "fused" or not (args.transformers_router or args.moe_pdl):
        yield
        return
    from pagedserve.engine.kernels.launch import supports_programmatic_launch
    from pagedserve.engine.kernels.moe.experts import MoeKernelPolicy, use_fused_moe

    use_pdl = args.moe_pdl and torch.cuda.is_available() and supports_programmatic_launch(torch.device("cuda"))
    swap = use_fused_moe(model, MoeKernelPolicy(use_pdl=use_pdl), fuse_router=not args.transformers_router)
    print(f"MoE switched before the engine: {swap.describe()}; PDL {'on' if use_pdl else 'off'}", flush=True)
    try:
        yield
    finally:
        swap.undo()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summary_table(payload: dict[str, Any]) -> str:
    """Markdown: one row per workload, output tok/s per engine, fused / transformers and fused / generate_batch."""
    results = payload["results"]
    engines = sorted({r["engine"] for rows in results.values() for r in rows})
    header = ["workload", *engines, "fused / transformers", "fused / generate_batch", "fused fp8 / fused bf16"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, rows in results.items():
        by_engine = {r["engine"]: r["output_tokens_per_s"] for r in rows}
        fused = by_engine.get("pagedserve moe_backend=fused")
        hf = by_engine.get("pagedserve moe_backend=transformers")
        baseline = by_engine.get("generate_batch")
        fp8 = by_engine.get("pagedserve moe_backend=fused fp8")
        cells = [f"{by_engine[e]:.1f}" if e in by_engine else "" for e in engines]
        lines.append("| " + " | ".join([name, *cells, _ratio(fused, hf), _ratio(fused, baseline), _ratio(fp8, fused)])
                     + " |")
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
        bound_fp8 = payload.get("batch1_bound_fp8_tokens_per_s")
        parts = [f"{engine}: {value / (bound_fp8 if engine.endswith(' fp8') else bound):.2f}"
                 for engine, value in b1.items()]
        lines.append(f"\nbatch 1 as a share of the active-weight bound ({bound:.0f} tok/s bf16, {bound_fp8:.0f} FP8, at "
                     f"{payload['copy_bandwidth_gb_s']:.0f} GB/s copy bandwidth): " + ", ".join(parts))
    for row in payload.get("microbench", []):
        measured = {k: v for k, v in row["us"].items() if v is not None}
        best = row["fastest"]
        lines.append(f"layer at {row['tokens']} tokens{' (FP8)' if row.get('fp8') else ''} "
                     f"({row['distinct_experts']:.1f} experts): fastest {best} "
                     f"{measured.get(best, float('nan')):.1f} us; auto picks {row['auto_kernel']}; "
                     + ", ".join(f"{k} {v:.1f}" for k, v in measured.items() if k.endswith("graph")))
        if row.get("tuning", {}).get("best"):
            lines.append(f"  tiles: best {row['tuning']['best']} {row['tuning']['us'][row['tuning']['best']]:.1f} us")
        tuning = row.get("rows_tuning", {})
        if tuning.get("best"):
            best_tiles = tuning["best"]
            op = "".join(f", op {tuning[key]:.1f} us{' with PDL' if 'pdl' in key else ''}"
                         for key in ("op_us", "op_us pdl") if tuning.get(key))
            lines.append(f"  rows tiles: gate_up {best_tiles['gate_up']} "
                         f"{tuning['gate_up_us'].get(best_tiles['gate_up']) or float('nan'):.1f} us, down "
                         f"{best_tiles['down']} {tuning['down_us'].get(best_tiles['down']) or float('nan'):.1f} us{op}")
    for fp8 in (False, True):
        table = rows_tiles_table(payload.get("microbench", []), fp8)
        if table:
            lines.append(f"\nbest per-pair tiles (engine/kernels/moe/triton.py's ROWS_TILES{'_FP8' if fp8 else ''}, "
                         "to paste):\n" + table)
    return "\n".join(lines)


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers for a quick smoke")
    parser.add_argument("--workloads", default="w64,w128,b1,w1moe", help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--backends", default=None,
                        help="EngineConfig.moe_backend values to run (default fused,transformers; --profile: fused)")
    parser.add_argument("--baseline", default="w128", help="workloads also run with generate_batch ('none': none)")
    parser.add_argument("--requests-scale", type=float, default=1.0,
                        help="scale every workload's request count (smoke runs)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap every workload's new tokens (smoke runs)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKEN_COUNTS)), help="microbenchmark token counts")
    parser.add_argument("--micro-only", action="store_true", help="only the per-layer microbenchmark")
    parser.add_argument("--micro-kernels", default=",".join(MICRO_KERNELS),
                        help=f"microbenchmark these of {','.join(MICRO_KERNELS)} (transformers: its grouped_mm, eager)")
    parser.add_argument("--profile", action="store_true",
                        help="only a torch.profiler run of batch-1 decode steps per backend: kernels per step, one "
                             "decoder layer kernel by kernel (experts vs the rest), the step extrapolated to the "
                             "shape's layer count (use with --layers 8 for a quick start)")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--transformers-router", action="store_true",
                        help="fused experts under transformers' own routers (A/B of the one-kernel router)")
    parser.add_argument("--moe-pdl", action="store_true",
                        help="launch the fused experts' per-pair kernels and the router with programmatic dependent "
                             "launch (Hopper+; the engine does not pass its PDL setting to the MoE kernels yet)")
    parser.add_argument("--no-micro", action="store_true", help="skip the per-layer microbenchmark")
    parser.add_argument("--tune", action="store_true",
                        help="also time alternative Triton tiles per token count: each per-pair GEMM's candidates up "
                             "to 8 tokens (printing the best as ROWS_TILES), the grouped kernel's above")
    parser.add_argument("--quantization", default="none",
                        help="comma list of none, fp8: the passes' weights in order (fp8: linears and experts "
                             "quantized in place, fused backend only)")
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
    bound_fp8 = bandwidth / active_weight_bytes(shape, fp8=True) if bandwidth else None
    quantizations = args.quantization.split(",")
    if quantizations not in (["none"], ["fp8"], ["none", "fp8"]):
        parser.error(f"--quantization: none, fp8 or none,fp8 (fp8 quantizes the model in place, so it comes last), "
                     f"not {args.quantization!r}")
    payload: dict[str, Any] = {
        "shape": shape.__dict__, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "copy_bandwidth_gb_s": bandwidth and bandwidth / 1e9, "active_weight_bytes": active_weight_bytes(shape),
        "batch1_bound_tokens_per_s": bound, "batch1_bound_fp8_tokens_per_s": bound_fp8,
        "quantization": quantizations, "results": {}, "microbench": [],
        "routers": "transformers" if args.transformers_router else "one kernel (fused backend)",
        "moe_pdl": args.moe_pdl,
    }

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload, indent=2, default=str))

    backends = (args.backends or ("fused" if args.profile else "fused,transformers")).split(",")
    def backends_for(quantization: str) -> list[str]:
        if quantization != "fp8" or "transformers" not in backends:
            return backends
        print("moe_backend=transformers skipped with FP8 weights: its expert code cannot run e4m3 experts", flush=True)
        return [b for b in backends if b != "transformers"]

    if args.profile:
        model, tokenizer = build_model(shape, device, dtype)
        payload["profile"] = []
        for quantization in quantizations:
            if quantization == "fp8":
                quantize_model_fp8(model)
            for backend in backends_for(quantization):
                with moe_switched_beforehand(model, backend, args):
                    payload["profile"] += profile_batch1(model, tokenizer, backend, shape, args)
        save()
        return 0
    if not args.no_micro:
        kernels = tuple(args.micro_kernels.split(","))
        unknown = set(kernels) - set(MICRO_KERNELS)
        if unknown:
            parser.error(f"--micro-kernels: unknown {', '.join(sorted(unknown))}; known: {', '.join(MICRO_KERNELS)}")
        for quantization in quantizations:
            rows = microbenchmark(shape, device, dtype, tuple(int(t) for t in args.tokens.split(",")), args.tune,
                                  kernels, fp8=quantization == "fp8")
            payload["microbench"] += [dict(row, fp8=quantization == "fp8") for row in rows]
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

        baseline_names = [] if args.baseline == "none" else [n for n in args.baseline.split(",") if n in workloads]
        for quantization in quantizations:
            if quantization == "fp8":
                quantize_model_fp8(model)
            for backend in backends_for(quantization):
                with moe_switched_beforehand(model, backend, args):
                    run_engine_workloads(model, tokenizer, backend, workloads, args, record,
                                         " fp8" if quantization == "fp8" else "")
            if quantization == "fp8" and baseline_names:
                print("generate_batch baselines skipped with FP8 weights (transformers' experts code)", flush=True)
            elif baseline_names and args.device != "cuda":
                print("generate_batch baselines skipped: they run on a GPU only", flush=True)
            elif baseline_names:
                from gpu_bench import run_generate_batch

                for name in baseline_names:
                    model.set_attn_implementation("sdpa")
                    record(name, run_generate_batch(model, workloads[name]))
                    print(f"generate_batch {name}: {payload['results'][name][-1]['output_tokens_per_s']:.1f} "
                          "output tok/s", flush=True)
    save()
    print()
    print(f"device: {payload['device']}; shape: {args.shape}, {shape.num_layers} layers; routers: {payload['routers']}; "
          f"MoE kernels with PDL: {args.moe_pdl}; weights: {args.quantization}")
    print(summary_table(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
