"""Multi-LoRA throughput (issue 29): W1 split evenly over adapters vs the base model alone, in one run.

Model: the Llama-3-8B shape with random bf16 weights (bench/gpu_bench.py's), built on the GPU. Adapters:
`--num-adapters` (8) of rank `--rank` (16) over q/k/v/o and gate/up/down of every layer, random A and B,
written in PEFT's format (adapter_config.json + adapter_model.safetensors) to a temporary folder and loaded
by the engine from there (`lora_modules`), so the timed load is the real one: files read, checked, copied
into device slots.

Runs, on one model object, one engine after the other:
  base   W1 (512 requests, prompts 64..1024, 256 new tokens, greedy, EOS ignored) on an engine without LoRA
  lora   the same W1 on an engine with the adapters (max_loras = number of adapters), request i under
         adapter i mod N: every step mixes all adapters
  b1     one request alone under an adapter and without one, on the LoRA engine (batch-1 decode tok/s)
Reported: output tok/s of each, the ratio lora/base (issue 29's bar: at least 0.80), adapter load times
(start-up per adapter: read + check; first copy into a device slot) and the engine's step times. A table is
printed last; `--out` writes JSON.

    python bench/lora_bench.py --out lora.json                  # 8B shape, W1, 8 adapters of rank 16
    python bench/lora_bench.py --layers 4 --num-requests 64     # quick GPU smoke
    python bench/lora_bench.py --shape tiny                     # CPU check of the script itself
    python bench/lora_bench.py --write-adapters /tmp/adapters --num-adapters 4   # only write them (no GPU),
        # for the service run of docs/lora.md; prints the lora_modules mapping
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult, RequestTiming, random_token_workload, release_memory, summarize_timings  # noqa: E402
from gpu_bench import record_steps, step_time_summary, triton_variants  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(shape: str, num_layers: int, device: str | torch.device):
    """(model, tokenizer): the 8B shape (gpu_bench's W1 model) or a tiny Llama for a CPU check."""
    from gpu_bench import w1_config_and_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    config, tokenizer = w1_config_and_tokenizer(num_layers)
    if shape == "tiny":
        config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, bos_token_id=128000, eos_token_id=128001)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if str(device) in ("cuda", "meta") else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval().requires_grad_(False)
    return model, tokenizer


def write_adapters(model, folder: Path, num_adapters: int, rank: int) -> dict[str, str]:
    """`num_adapters` random rank-`rank` adapters of `model` in PEFT's format; name -> folder."""
    from safetensors.torch import save_file

    linears = {name: module for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, torch.nn.Linear)}
    paths = {}
    for index in range(num_adapters):
        generator = torch.Generator().manual_seed(1000 + index)
        tensors = {}
        for name, linear in linears.items():
            a = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features ** 0.5
            b = torch.randn(linear.out_features, rank, generator=generator) * 0.01
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16)
        out = folder / f"adapter-{index}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
            "bias": "none", "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM"}))
        paths[out.name] = str(out)
    return paths


def timed_generate(llm, prompts, max_new_tokens: int, lora, name: str) -> BenchResult:
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_new_tokens, ignore_eos=True)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora=lora)
    sync()
    wall_s = time.perf_counter() - started
    timings = [RequestTiming(o.metrics.arrival_time, o.metrics.first_token_time, o.metrics.last_token_time,
                             len(o.outputs[0].token_ids)) for o in outputs]
    ttft, tpot = summarize_timings(timings)
    return BenchResult(engine=name, num_requests=len(outputs), num_prompt_tokens=sum(len(p) for p in prompts),
                       num_output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs), wall_s=wall_s,
                       ttft_s=ttft, tpot_s=tpot, peak_memory_bytes=None, memory_kind="not measured")


def start_engine(model, tokenizer, args, **lora_args):
    from pagedserve.engine.llm import LLM

    started = time.perf_counter()
    llm = LLM.from_model(model, tokenizer, served_name="llama-3-8b-shape", max_num_seqs=args.max_num_seqs,
                         max_memory_percent=args.max_memory_percent, enable_prefix_caching=False, **lora_args)
    print(f"engine start{' with adapters' if lora_args else ''}: {time.perf_counter() - started:.1f} s; "
          f"{llm.engine.memory_plan.describe()}", flush=True)
    # Warm-up outside the clock (kernels compiled), under an adapter too where there are adapters.
    warm = [list(range(1000, 1128)), list(range(2000, 2016))]
    names = list(lora_args.get("lora_modules") or {})
    timed_generate(llm, warm, 4, [names[0], None] if names else None, "warm-up")
    return llm


def step_summary(steps) -> dict[str, Any]:
    durations = sorted(s.step_time_s for s in steps)
    if not durations:
        return {"num_steps": len(steps)}
    return {"num_steps": len(steps), "step_ms_p50": 1000 * durations[len(durations) // 2],
            "step_ms_p90": 1000 * durations[int(len(durations) * 0.9)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["8b", "tiny"], default="8b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (8b: 32, tiny: 2)")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--min-prompt-len", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--single-tokens", type=int, default=128, help="batch-1 new tokens (0: skip b1)")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-memory-percent", type=float, default=0.9)
    parser.add_argument("--skip-base", action="store_true", help="only the LoRA engine")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--write-adapters", type=Path, default=None, metavar="DIR",
                        help="only write --num-adapters adapters of the shape into DIR (no weights built) and exit")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_layers = args.layers or (32 if args.shape == "8b" else 2)
    if args.write_adapters is not None:  # the shapes are all it needs: a model on the meta device
        model, _ = build_model(args.shape, num_layers, "meta")
        paths = write_adapters(model, args.write_adapters, args.num_adapters, args.rank)
        print(json.dumps({"lora_modules": paths}))
        return 0
    model, tokenizer = build_model(args.shape, num_layers, device)
    vocab = model.config.vocab_size
    workload = random_token_workload(args.num_requests, args.min_prompt_len, args.max_prompt_len, args.max_new_tokens,
                                     min(vocab, 128000), seed=0)
    print(f"{args.shape} shape, {num_layers} layers on {device}; W1: {workload.description}", flush=True)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device}
    results: list[BenchResult] = []
    if not args.skip_base:
        llm = start_engine(model, tokenizer, args)
        steps = record_steps(llm.engine)
        base = timed_generate(llm, workload.prompts, workload.max_new_tokens, None, "base model")
        base.details = step_summary(steps)
        results.append(base)
        print(f"base: {base.output_tokens_per_s:,.0f} output tok/s; {step_time_summary(steps)}", flush=True)
        report["base_kv_blocks"] = llm.engine.memory_plan.num_blocks
        llm.engine.shutdown()
        del llm, steps
        release_memory()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as folder:
        started = time.perf_counter()
        adapters = write_adapters(model, Path(folder), args.num_adapters + 1, args.rank)
        late_path = adapters.pop(f"adapter-{args.num_adapters}")  # loaded at run time, timed
        print(f"{len(adapters)} adapters of rank {args.rank} written in {time.perf_counter() - started:.1f} s",
              flush=True)
        llm = start_engine(model, tokenizer, args, lora_modules=adapters, max_loras=len(adapters),
                           max_lora_rank=args.rank)
        report["lora_kv_blocks"] = llm.engine.memory_plan.num_blocks
        manager = llm.engine.runner.lora
        host_load_s = {name: manager._host[name].load_time_s for name in adapters if name in manager._host}
        names = list(adapters)
        steps = record_steps(llm.engine)
        variants_before = triton_variants()
        lora = timed_generate(llm, workload.prompts, workload.max_new_tokens,
                              [names[i % len(names)] for i in range(workload.num_requests)],
                              f"{len(names)} adapters, rank {args.rank}")
        lora.details = step_summary(steps)
        results.append(lora)
        # A kernel variant compiled inside the timed run costs its compilation (about a second) inside a step.
        variants_after = triton_variants()
        print(f"lora: {lora.output_tokens_per_s:,.0f} output tok/s; Triton kernel variants compiled during the run: "
              f"{variants_after - variants_before} ({variants_after} in the process); {step_time_summary(steps)}",
              flush=True)
        report["adapter_load"] = {
            "read_and_check_s": host_load_s,
            "device_slot_loads": manager.num_device_loads_total,
            "device_slot_load_s_mean": manager.device_load_time_s_total / max(1, manager.num_device_loads_total),
        }
        started = time.perf_counter()
        llm.engine.add_lora("late", late_path)
        report["adapter_load"]["run_time_add_s"] = time.perf_counter() - started
        if args.single_tokens:
            prompt = [workload.prompts[0][:128]]
            for label, name in (("b1 under an adapter", names[0]), ("b1 base rows (LoRA engine)", None)):
                single = timed_generate(llm, prompt, args.single_tokens, name, label)
                results.append(single)
        llm.engine.shutdown()
        del llm, steps, manager
        release_memory()
    if not args.skip_base:
        report["lora_over_base"] = results[1].output_tokens_per_s / results[0].output_tokens_per_s
    report["results"] = [r.to_json() for r in results]
    print()
    print("| run | requests | output tok/s | TTFT p50 s | TPOT p50 ms |")
    print("|---|---|---|---|---|")
    for r in results:
        ttft = f"{r.ttft_s['p50']:.3f}" if r.ttft_s else "-"
        tpot = f"{1000 * r.tpot_s['p50']:.2f}" if r.tpot_s else "-"
        print(f"| {r.engine} | {r.num_requests} | {r.output_tokens_per_s:,.1f} | {ttft} | {tpot} |")
    if "lora_over_base" in report:
        print(f"\nLoRA W1 / base W1: {report['lora_over_base']:.3f} (issue 29's bar: >= 0.80); KV blocks: base "
              f"{report['base_kv_blocks']}, LoRA {report['lora_kv_blocks']}")
    print(f"adapter load: {json.dumps(report['adapter_load'])}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
