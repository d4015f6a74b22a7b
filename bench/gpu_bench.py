"""GPU throughput: this engine vs transformers' `generate_batch` on one workload, in one run.

W1 (the default): Llama-3-8B shape with random bf16 weights, 512 requests, prompt lengths uniform in
64..1024 random tokens, 256 new tokens each, greedy, EOS ignored, all submitted at once. Smaller
workloads through flags. Also: one request alone (batch 1) and greedy agreement with transformers'
`generate` on the first tokens of a few requests. Prints a table last; `--out` writes JSON.

    python bench/gpu_bench.py                       # W1, both engines
    python bench/gpu_bench.py --num-requests 64 --skip-baseline --layers 4
    python bench/gpu_bench.py --skip-baseline --kv-cache-dtype fp8   # W1 with an FP8 KV cache
    # long context (prompt + output within the shape's 8,192 positions), bf16 then FP8 KV:
    python bench/gpu_bench.py --skip-baseline --check-requests 0 --num-requests 256 --min-prompt-len 4096 \
        --max-prompt-len 7936 --max-new-tokens 256 --kv-cache-dtype fp8
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BenchResult,
    RequestTiming,
    Workload,
    comparison_table,
    parse_engine_args,
    random_token_workload,
    summarize_timings,
)


def w1_config_and_tokenizer(num_layers: int = 32):
    """The Llama-3-8B shape and a word-level tokenizer over its 128,256 ids (no weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
    )
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w128001", bos_token="w128000")
    return config, tokenizer


def write_model_dir(path: Path, num_layers: int = 32) -> None:
    """config.json and the tokenizer, for a service started with load_format=dummy (random weights)."""
    config, tokenizer = w1_config_and_tokenizer(num_layers)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_model(args: argparse.Namespace):
    from transformers import LlamaForCausalLM

    config, tokenizer = w1_config_and_tokenizer(args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval().requires_grad_(False)
    return model, tokenizer


def quantize_linear_layers(model, quantization: str) -> None:
    """Swap every decoder nn.Linear for the bitsandbytes layer that `BitsAndBytesConfig` would build
    (4-bit: NF4, double quantization, bf16 compute; 8-bit: LLM.int8 with threshold 6.0), quantizing the
    random bf16 weights on the GPU. lm_head stays bf16, as transformers keeps it. Same layers as a
    quantized `from_pretrained`, without writing 16 GB of random weights to disk first."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    for module in list(model.model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            weight = child.weight.data
            if quantization == "bnb-4bit":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type="nf4", device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", module=layer)._quantize(device)
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0, device="meta")
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(device)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer)
            del child, weight
    torch.cuda.empty_cache()


def start_engine(model, tokenizer, args, **engine_args):
    """The engine over the in-memory model, or with `--tp-size`, over the model directory with random
    weights drawn by every rank (load_format=dummy: each rank builds the same model from the seed)."""
    from pagedserve.engine.llm import LLM

    if args.tp_size is not None:
        model_dir = Path(tempfile.mkdtemp(prefix="w1-model-"))
        write_model_dir(model_dir, args.layers)
        return LLM(str(model_dir), load_format="dummy", dtype="bfloat16", tp_size=args.tp_size, **engine_args)
    return LLM.from_model(model, tokenizer, served_name="llama-3-8b-shape", **engine_args)


def run_ours(model, tokenizer, workload: Workload, args) -> tuple[BenchResult, list[list[int]], object]:
    from pagedserve.engine.core.request import SamplingParams

    if model is not None:
        model.set_attn_implementation("sdpa")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine_args = {"max_num_seqs": args.max_num_seqs,
                   "attention_backend": args.attention_backend, "max_memory_percent": args.max_memory_percent,
                   "max_batch_tokens": args.max_batch_tokens, "enable_prefix_caching": False,
                   "compile": args.compile, "fuse_projections": args.fuse_projections,
                   "programmatic_launch": args.programmatic_launch, "kv_cache_dtype": args.kv_cache_dtype,
                   "cuda_graph_max_mixed_tokens": args.cuda_graph_max_mixed_tokens}
    engine_args.update(parse_engine_args(args.engine_arg))
    started = time.perf_counter()
    try:
        llm = start_engine(model, tokenizer, args, **engine_args)
    except Exception as error:  # noqa: BLE001 -- e.g. a quantized matmul that cannot be captured
        print(f"engine start failed ({type(error).__name__}: {error}); retrying with eager decode", flush=True)
        llm = None
    if llm is None:  # outside the except block, so the failed engine's KV cache can be freed first
        gc.collect()
        torch.cuda.empty_cache()
        llm = start_engine(model, tokenizer, args, enable_cuda_graphs=False, **engine_args)
    cuda_graphs = llm.engine.runner._decode_graphs is not None
    compiled = bool(getattr(llm.engine.runner._step_model, "is_compiled", False))
    print(f"engine start (profiling, CUDA graphs{', compile' if compiled else ''}): "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    print(llm.engine.memory_plan.describe(), flush=True)
    steps = record_steps(llm.engine)
    started = time.perf_counter()
    # Warm-up: kernels compiled before the clock starts, for the batch-1 run's prompt length too.
    llm.generate([workload.prompts[0][:128], workload.prompts[1][:16]],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    print(f"warm-up {time.perf_counter() - started:.1f} s", flush=True)
    steps.clear()
    fresh_single = run_single(llm, workload, args.single_tokens) if args.single_tokens else None
    if fresh_single:
        profile = decode_step_profile(steps, args.single_tokens / fresh_single)
        print(f"batch 1 (fresh engine, before W1): {fresh_single:.1f} tok/s; {profile}", flush=True)
    steps.clear()
    params = SamplingParams(temperature=0, max_tokens=workload.max_new_tokens, ignore_eos=True)
    variants_before = triton_variants()
    started = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall_s = time.perf_counter() - started
    print(step_time_summary(steps), flush=True)
    largest_batch = max((s.num_seqs for s in steps), default=0)
    variants_after = triton_variants()
    print(f"Triton kernel variants compiled during the run: {variants_after - variants_before} "
          f"({variants_after} in the process)", flush=True)
    timings = [
        RequestTiming(o.metrics.arrival_time, o.metrics.first_token_time, o.metrics.last_token_time,
                      len(o.outputs[0].token_ids))
        for o in outputs
    ]
    ttft, tpot = summarize_timings(timings)
    stats = llm.engine.get_stats()
    result = BenchResult(
        engine="pagedserve", num_requests=len(outputs), num_prompt_tokens=workload.num_prompt_tokens,
        num_output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs), wall_s=wall_s, ttft_s=ttft,
        tpot_s=tpot, peak_memory_bytes=torch.cuda.max_memory_allocated(), memory_kind="torch.cuda max allocated",
        details={"preemptions": stats.num_preemptions_total, "kv_tokens": llm.engine.memory_plan.kv_tokens,
                 "kv_cache_dtype": llm.engine.memory_plan.kv_cache_dtype,
                 "attention_backend": llm.engine.runner.backend.name, "quantization": args.quantization,
                 "weights_bytes": llm.engine.memory_plan.weights_bytes, "kv_bytes": llm.engine.memory_plan.kv_bytes,
                 "largest_batch": largest_batch, "cuda_graphs": cuda_graphs, "compile": compiled, "batch1_fresh_tokens_per_s": fresh_single},
    )
    return result, [o.outputs[0].token_ids for o in outputs], llm


def record_steps(engine) -> list:
    """From now on, append the stats of every engine step that ran (`engine.last_step`) to the returned list."""
    steps: list = []
    engine_step = engine.step

    def recording_step():
        deltas = engine_step()
        if engine.last_step is not None:
            steps.append(engine.last_step)
        return deltas

    engine.step = recording_step
    return steps


def triton_variants() -> int:
    """Variants of the engine's Triton kernels compiled so far in this process: one compiled inside a timed
    run costs its compilation (about a second) inside a step."""
    from pagedserve.engine.kernels import decode_linear, lora
    from pagedserve.engine.kernels.attention import triton as triton_attention

    kernels = [triton_attention._paged_attention_kernel, triton_attention._write_kv_kernel,
               triton_attention._combine_splits_kernel, getattr(decode_linear, "_skinny_gemm_kernel", None),
               getattr(lora, "_lora_shrink_kernel", None), getattr(lora, "_lora_expand_kernel", None)]
    return sum(len(caches[0]) for kernel in kernels if kernel is not None
               for caches in getattr(kernel, "device_caches", {}).values())


def step_time_summary(steps) -> str:
    """Where the wall time went: steps that carry prompt tokens vs pure decode steps, by batch size."""
    prefill = [s for s in steps if s.num_prefill_tokens]
    decode = [s for s in steps if not s.num_prefill_tokens]
    lines = [f"steps: {len(steps)}; with prompt tokens: {len(prefill)} steps, "
             f"{sum(s.step_time_s for s in prefill):.2f} s, {sum(s.num_prefill_tokens for s in prefill)} prompt tokens; "
             f"pure decode: {len(decode)} steps, {sum(s.step_time_s for s in decode):.2f} s"]
    for low, high in ((1, 64), (65, 256), (257, 512)):
        bucket = [s for s in decode if low <= s.num_seqs <= high]
        if bucket:
            mean_ms = sum(s.step_time_s for s in bucket) / len(bucket) * 1000
            tokens = sum(s.num_decode_tokens for s in bucket)
            lines.append(f"  decode steps of {low}-{high} sequences: {len(bucket)}, mean {mean_ms:.1f} ms, "
                         f"{tokens / sum(s.step_time_s for s in bucket):.0f} tok/s")
    return "\n".join(lines)


def decode_step_profile(steps, wall_s: float | None = None) -> str:
    """Whether a slow batch-1 run is slow throughout or pays a one-off cost: its decode steps' times, the
    steps that carried the prompt, and (given the run's wall time) what went outside the engine's steps."""
    times_ms = sorted(s.step_time_s * 1000 for s in steps if not s.num_prefill_tokens)
    if not times_ms:
        return "no decode steps"
    ordered = [s.step_time_s * 1000 for s in steps if not s.num_prefill_tokens]
    prompt_ms = sum(s.step_time_s * 1000 for s in steps if s.num_prefill_tokens)
    text = (f"{len(times_ms)} decode steps, median {times_ms[len(times_ms) // 2]:.2f} ms, "
            f"max {times_ms[-1]:.1f} ms, sum {sum(times_ms):.0f} ms, first five "
            + " ".join(f"{t:.1f}" for t in ordered[:5])
            + f"; prompt steps {prompt_ms:.1f} ms")
    if wall_s is not None:
        text += f"; outside the steps {wall_s * 1000 - prompt_ms - sum(times_ms):.1f} ms of {wall_s * 1000:.0f}"
    return text


def run_single(llm, workload: Workload, new_tokens: int) -> float:
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    llm.generate([workload.prompts[0][:128]], params, use_tqdm=False)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - started)


def collective_profile(llm, workload: Workload, batch_sizes: tuple[int, ...], new_tokens: int = 32) -> list[dict]:
    """Rank 0's NCCL kernel time per engine step (the all-reduces and the logits all-gather), from the
    torch profiler over a short generate at each batch size (prompts cut to 128 tokens). A collective's
    kernel also holds the time rank 0 waits for its peer, so this is an upper bound of the transfer."""
    from pagedserve.engine.core.request import SamplingParams
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    on_gpu = torch.cuda.is_available()  # on a CPU (a check of this script) the gloo ops' CPU time instead

    def self_us(event) -> float:
        if not on_gpu:
            return event.self_cpu_time_total
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)

    def is_collective(key: str) -> bool:
        return "nccl" in key.lower() or "pagedserve::tp_" in key

    rows = []
    for batch in batch_sizes:
        prompts = [p[:128] for p in workload.prompts[:batch]]
        llm.generate(prompts, params, use_tqdm=False)  # the same shapes once before the profile
        engine_step, steps = llm.engine.step, []

        def counted():
            deltas = engine_step()
            steps.append(llm.engine.last_step)
            return deltas

        llm.engine.step = counted
        try:
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                torch.cuda.synchronize()
                wall_s = time.perf_counter() - started
        finally:
            llm.engine.step = engine_step
        times = [(e.key, self_us(e)) for e in prof.key_averages()]
        nccl_us = sum(us for key, us in times if is_collective(key))
        gpu_us = sum(us for _, us in times)
        decode = [s for s in steps if s is not None and not s.num_prefill_tokens]
        rows.append({
            "batch": batch, "steps": len(steps), "decode_steps": len(decode),
            "wall_ms_per_step": wall_s * 1000 / max(len(steps), 1),
            "nccl_ms_per_step": nccl_us / 1000 / max(len(steps), 1),
            "gpu_kernel_ms_per_step": gpu_us / 1000 / max(len(steps), 1),
            "nccl_kernels": sorted({key for key, _ in times if is_collective(key)}),
        })
    return rows


def compare_tokens(ours: list[list[int]], reference: list[list[int]], num_tokens: int) -> dict:
    """How many requests agree with another run's greedy tokens over the first `num_tokens`."""
    prefixes = [_common_prefix(a[:num_tokens], b[:num_tokens]) for a, b in zip(ours, reference)]
    ordered = sorted(prefixes)
    return {"equal": sum(p >= num_tokens for p in prefixes), "checked": len(prefixes), "tokens": num_tokens,
            "min_prefix": ordered[0] if ordered else None, "median_prefix": ordered[len(ordered) // 2] if ordered else None,
            "full_outputs_equal": sum(a == b for a, b in zip(ours, reference))}


CLOSE_TOP_K = 5  # a divergence is a near-tie when each side's token is in the other's top 5 (vLLM's test rule)


def ours_with_logprobs(llm, workload: Workload, num_requests: int, num_tokens: int) -> list[tuple[list[int], list[set[int]]]]:
    """Our greedy tokens for the checked requests, with the top-k ids at each position (logprobs=k)."""
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True, logprobs=CLOSE_TOP_K)
    outputs = llm.generate(workload.prompts[:num_requests], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [set(position) for position in o.outputs[0].logprobs]) for o in outputs]


def _greedy(model, prompt: list[int], num_tokens: int, attn_implementation: str):
    """transformers' greedy tokens, the top-k ids and the logits at each position."""
    model.set_attn_implementation(attn_implementation)
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=num_tokens, do_sample=False,
                         min_new_tokens=num_tokens, eos_token_id=None, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    logits = [step[0].float() for step in out.logits]
    tops = [set(step.topk(CLOSE_TOP_K).indices.tolist()) for step in logits]
    return out.sequences[0, len(prompt):].tolist(), tops, logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _compare(tokens, tops, ref_tokens, ref_tops, ref_logits, num_tokens: int) -> dict:
    """Common prefix with the reference; at the first divergence, whether it is a near-tie (each token in
    the other's top-k) and the reference's logit gap between its token and ours."""
    prefix = _common_prefix(tokens[:num_tokens], ref_tokens[:num_tokens])
    if prefix >= num_tokens:
        return {"prefix": prefix, "near_tie": None, "logit_gap": None}
    mine, theirs = tokens[prefix], ref_tokens[prefix]
    gap = float(ref_logits[prefix][theirs] - ref_logits[prefix][mine])
    return {"prefix": prefix, "near_tie": mine in ref_tops[prefix] and theirs in tops[prefix], "logit_gap": round(gap, 4)}


def check_against_generate(model, workload: Workload, ours, num_tokens: int) -> tuple[list[dict], list[dict]]:
    """Ours vs generate(sdpa) on the first requests, and as the noise floor of bf16 near-ties on random
    weights, generate(eager) vs generate(sdpa): two transformers kernels on the same model."""
    ours_vs_sdpa, eager_vs_sdpa = [], []
    for prompt, (tokens, tops) in zip(workload.prompts, ours):
        sdpa, sdpa_tops, sdpa_logits = _greedy(model, prompt, num_tokens, "sdpa")
        eager, eager_tops, _ = _greedy(model, prompt, num_tokens, "eager")
        ours_vs_sdpa.append(_compare(tokens, tops, sdpa, sdpa_tops, sdpa_logits, num_tokens))
        eager_vs_sdpa.append(_compare(eager, eager_tops, sdpa, sdpa_tops, sdpa_logits, num_tokens))
    return ours_vs_sdpa, eager_vs_sdpa


def agreement_summary(rows: list[dict], num_tokens: int) -> str:
    exact = sum(r["prefix"] >= num_tokens for r in rows)
    close = sum(r["prefix"] >= num_tokens or bool(r["near_tie"]) for r in rows)
    diverged = [f"{r['prefix']}@{r['logit_gap']}" for r in rows if r["prefix"] < num_tokens]
    return (f"{exact}/{len(rows)} equal over {num_tokens} tokens, {close}/{len(rows)} equal or diverging at a "
            f"near-tie (top-{CLOSE_TOP_K} both ways); divergences position@logit gap: {' '.join(diverged) or '-'}")


def run_generate_batch(model, workload: Workload) -> BenchResult:
    from transformers import GenerationConfig

    model.set_attn_implementation("sdpa")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = GenerationConfig(max_new_tokens=workload.max_new_tokens, do_sample=False, eos_token_id=-1)
    started = time.perf_counter()
    results = model.generate_batch(inputs=workload.prompts, generation_config=config, progress_bar=False)
    torch.cuda.synchronize()
    wall_s = time.perf_counter() - started
    ordered = list(results.values())
    return BenchResult(
        engine="generate_batch", num_requests=len(ordered), num_prompt_tokens=workload.num_prompt_tokens,
        num_output_tokens=sum(len(o.generated_tokens) for o in ordered), wall_s=wall_s, ttft_s=None, tpot_s=None,
        peak_memory_bytes=torch.cuda.max_memory_allocated(), memory_kind="torch.cuda max allocated",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--min-prompt-len", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32, help="32 is Llama-3-8B; fewer for quick checks")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--max-memory-percent", type=float, default=0.9)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--engine-arg", action="append", default=[],
                        help="another EngineConfig field, key=value (true/false and digits converted)")
    parser.add_argument("--cuda-graph-max-mixed-tokens", default="auto",
                        help="EngineConfig.cuda_graph_max_mixed_tokens (0: steps with prompt tokens run eagerly)")
    parser.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                        help="torch.compile the decoder layers (EngineConfig.compile; default: the engine's "
                             "choice, on for a GPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    parser.add_argument("--no-fuse-projections", dest="fuse_projections", action="store_false",
                        help="run q/k/v and gate/up as separate GEMMs (EngineConfig.fuse_projections=false)")
    parser.add_argument("--no-programmatic-launch", dest="programmatic_launch", action="store_false",
                        help="launch kernels without PDL (EngineConfig.programmatic_launch=false)")
    parser.add_argument("--quantization", choices=["none", "bnb-4bit", "bnb-8bit", "fp8"], default="none",
                        help="quantize the random bf16 model's decoder linears before the run: bitsandbytes, or fp8 "
                        "(the layers quantization='fp8' loads)")
    parser.add_argument("--no-fp8-fast-accum", action="store_true",
                        help="FP8 GEMMs without _scaled_mm's fast accumulation (engine/kernels/fp8_linear.py "
                             "FAST_ACCUMULATION off in this process; the product's default is on)")
    parser.add_argument("--no-fp8-mlp-fusion", action="store_true",
                        help="FP8 MLPs unfused: SiLU * up, then the down projection's own quantization (engine/kernels/"
                             "fp8_mlp.py FUSE_ACTIVATION_QUANTIZATION off in this process), for an A/B against the "
                             "fused default (--save-tokens / --compare-tokens: same greedy tokens)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="what the KV cache stores (EngineConfig.kv_cache_dtype): auto, the model's bf16; fp8, "
                        "e4m3 with per-layer scales of 1.0 (twice the tokens in the same memory)")
    parser.add_argument("--baseline-only", action="store_true",
                        help="run generate_batch alone and write its result to --out (a clean process for each engine)")
    parser.add_argument("--baseline-json", type=Path, default=None,
                        help="a --baseline-only result from this machine, reported beside ours instead of rerunning it")
    parser.add_argument("--single-tokens", type=int, default=512, help="batch-1 decode length (0 skips)")
    parser.add_argument("--check-requests", type=int, default=16)
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--tp-size", type=int, default=None,
                        help="tensor-parallel ranks: the engine loads the model directory with random weights "
                             "drawn on every rank (load_format=dummy) instead of the in-memory model; no "
                             "generate_batch baseline or generate agreement (no in-memory model) in this mode")
    parser.add_argument("--save-tokens", type=Path, default=None, help="write every request's output ids (JSON)")
    parser.add_argument("--compare-tokens", type=Path, default=None,
                        help="a --save-tokens file of another run (e.g. TP=1): report the share of requests whose "
                             "first --check-tokens tokens are equal")
    parser.add_argument("--profile-collectives", type=int, nargs="*", default=None, metavar="BATCH",
                        help="after the run, profile NCCL kernel time per step at these batch sizes (TP)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--write-model-dir", type=Path, default=None,
                        help="only write the model's config.json and tokenizer there (for a service with "
                             "load_format=dummy) and exit")
    args = parser.parse_args()
    if args.no_fp8_fast_accum:
        from pagedserve.engine.kernels import fp8_linear

        fp8_linear.FAST_ACCUMULATION = False  # this process's FP8 GEMMs: the offline engine runs here
        print("FP8 GEMMs without fast accumulation", flush=True)
    if args.no_fp8_mlp_fusion:
        from pagedserve.engine.kernels import fp8_mlp

        fp8_mlp.FUSE_ACTIVATION_QUANTIZATION = False  # read when the engine's runner is built, in this process
        print("FP8 MLPs unfused", flush=True)
    if args.write_model_dir is not None:
        write_model_dir(args.write_model_dir, args.layers)
        print(f"wrote {args.write_model_dir}")
        return 0

    workload = random_token_workload(args.num_requests, args.min_prompt_len, args.max_prompt_len,
                                     args.max_new_tokens, vocab_size=128000, seed=0)
    print(workload.description, flush=True)
    if args.tp_size is not None:
        args.skip_baseline, args.check_requests, args.quantization = True, 0, "none"
        model, tokenizer = None, None
    else:
        model, tokenizer = build_model(args)
    if args.quantization == "fp8":
        from pagedserve.engine.kernels.fp8_linear import quantize_linears

        quantize_linears(model)  # the layers EngineConfig(quantization="fp8") loads (engine/runner/loader.py)
        torch.cuda.empty_cache()
        print(f"quantized with fp8: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated", flush=True)
    elif args.quantization != "none":
        quantize_linear_layers(model, args.quantization)
        print(f"quantized with {args.quantization}: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated",
              flush=True)
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    if args.baseline_only:
        baseline = run_generate_batch(model, workload)
        print(f"generate_batch: {baseline.output_tokens_per_s:.1f} output tok/s in {baseline.wall_s:.1f} s, "
              f"peak {baseline.peak_memory_bytes / 2**30:.1f} GiB", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(baseline.to_json(), indent=2))
        return 0
    ours, ours_tokens, llm = run_ours(model, tokenizer, workload, args)
    print(f"pagedserve: {ours.output_tokens_per_s:.0f} output tok/s in {ours.wall_s:.1f} s", flush=True)
    single = run_single(llm, workload, args.single_tokens) if args.single_tokens else None
    if single:
        print(f"batch 1 (after W1, same engine): {single:.1f} tok/s", flush=True)
    collectives = None
    if args.profile_collectives:
        collectives = collective_profile(llm, workload, tuple(args.profile_collectives))
        for row in collectives:
            print(f"collectives at batch {row['batch']}: {row['nccl_ms_per_step']:.3f} ms NCCL kernel time a step "
                  f"of {row['wall_ms_per_step']:.2f} ms wall ({row['steps']} steps; {row['nccl_kernels']})", flush=True)
    if args.save_tokens:
        args.save_tokens.write_text(json.dumps(ours_tokens))
    token_match = None
    if args.compare_tokens:
        token_match = compare_tokens(ours_tokens, json.loads(args.compare_tokens.read_text()), args.check_tokens)
        print(f"greedy tokens vs {args.compare_tokens.name}: {token_match}", flush=True)
    checked = (ours_with_logprobs(llm, workload, args.check_requests, args.check_tokens)
               if model is not None and args.check_requests else [])
    # Gives the model back uncompiled for transformers' own generate below, and unfreezes the engine's
    # objects so that its KV cache can be freed before the baseline.
    llm.engine.shutdown()
    rows, control = check_against_generate(model, workload, checked, args.check_tokens) if checked else ([], [])
    agreement = (f"greedy agreement with transformers (bf16): pagedserve vs generate(sdpa): "
                 f"{agreement_summary(rows, args.check_tokens)}\n  control, generate(eager) vs generate(sdpa): "
                 f"{agreement_summary(control, args.check_tokens)}")
    if checked:
        print(agreement, flush=True)
    del llm  # shut down above: its objects are unfrozen, so its KV cache can really be freed
    gc.collect()
    torch.cuda.empty_cache()
    results = [ours]
    if args.baseline_json is not None:
        results.append(BenchResult.from_json(json.loads(args.baseline_json.read_text())))
    elif not args.skip_baseline:
        results.append(run_generate_batch(model, workload))
    payload = {
        "workload": workload.description, "device": torch.cuda.get_device_name(0), "device_gib": total_gib,
        "results": [r.to_json() for r in results], "batch1_tokens_per_s": single,
        "batch1_fresh_tokens_per_s": ours.details["batch1_fresh_tokens_per_s"],
        "generate_agreement": {"tokens": args.check_tokens, "top_k": CLOSE_TOP_K, "ours_vs_sdpa": rows,
                               "control_eager_vs_sdpa": control},
        "tp_size": args.tp_size or 1, "collectives": collectives, "token_match": token_match,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
    print()
    print(f"device: {payload['device']} ({total_gib:.0f} GiB); {workload.description}")
    print(f"batch-1 decode: {single and round(single, 1)} tok/s after W1, "
          f"{ours.details['batch1_fresh_tokens_per_s'] and round(ours.details['batch1_fresh_tokens_per_s'], 1)} "
          f"tok/s on the fresh engine; preemptions: {ours.details['preemptions']}; "
          f"KV capacity: {ours.details['kv_tokens']} tokens ({ours.details['kv_cache_dtype']}, "
          f"{ours.details['kv_bytes'] / 2**30:.1f} GiB); backend: {ours.details['attention_backend']}; "
          f"quantization: {args.quantization}; largest batch: {ours.details['largest_batch']}; "
          f"CUDA graphs: {ours.details['cuda_graphs']}; tensor-parallel ranks: {args.tp_size or 1}"
          + (" (peak memory: rank 0's)" if (args.tp_size or 1) > 1 else ""))
    if checked:
        print(agreement)
    if token_match:
        print(f"greedy tokens equal to {args.compare_tokens.name} over the first {args.check_tokens}: "
              f"{token_match['equal']}/{token_match['checked']} requests (all {workload.max_new_tokens} tokens: "
              f"{token_match['full_outputs_equal']}; shortest common prefix {token_match['min_prefix']}, "
              f"median {token_match['median_prefix']})")
    for row in collectives or ():
        print(f"NCCL kernel time at batch {row['batch']}: {row['nccl_ms_per_step']:.3f} ms a step "
              f"({row['wall_ms_per_step']:.2f} ms wall a step, {row['gpu_kernel_ms_per_step']:.2f} ms of kernels)")
    if len(results) > 1:
        print(comparison_table(results))
    else:
        print(f"pagedserve: {ours.output_tokens_per_s:.1f} output tok/s, {ours.total_tokens_per_s:.1f} total tok/s, "
              f"peak {ours.peak_memory_bytes / 2**30:.1f} GiB, TTFT {ours.ttft_s}, TPOT {ours.tpot_s}, "
              f"KV capacity {ours.details['kv_tokens']} tokens ({ours.details['kv_cache_dtype']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
