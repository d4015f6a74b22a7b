"""Speculative decoding (ngram) against plain decoding on a model trained on text (bench/train_text_model.py).

Random weights accept nothing, so this needs a trained folder (its `heldout.jsonl` gives the texts). Two
workloads at batch 1, greedy, each request alone:
- edit: the prompt holds a held-out passage, then the passage's first lines again with one change (a word
  replaced); the model continues copying the passage, which prompt lookup proposes;
- free: the first tokens of a held-out file, then free generation.
For each: output tokens/s plain and with ngram, the speed-up, the acceptance rate (accepted / proposed)
and mean accepted tokens per verification, and whether the outputs were equal token for token (they must
be, up to float near-ties of the GPU's batched kernels). Then a batch sweep on the edit workload, speculation
forced on (`speculative_disable_batch_size` = the batch), to find where it stops paying: the crossover for the
`speculative_disable_batch_size` default. Speculative steps run outside the decode CUDA graphs (eager, the
decoder layers still compiled), plain decode steps inside them.

    python bench/spec_bench.py --model /tmp/target --k 3,5 --out spec.json

A table comes last; `--out` writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

WORKLOADS = ("edit", "free")


def heldout_texts(model_dir: Path, num: int, min_chars: int = 2000) -> list[str]:
    texts = []
    with open(model_dir / "heldout.jsonl") as lines:
        for line in lines:
            text = json.loads(line)["text"]
            if len(text) >= min_chars:
                texts.append(text)
            if len(texts) == num:
                break
    if not texts:
        raise SystemExit(f"{model_dir}/heldout.jsonl has no document of {min_chars}+ characters")
    return texts


def edit_prompt(tokenizer, text: str, passage_tokens: int, restart_tokens: int) -> list[int]:
    """The passage, a blank line, then its start again with its first longer word replaced."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:passage_tokens]
    passage = tokenizer.decode(ids)
    start = tokenizer.decode(ids[:restart_tokens])
    words = [w for w in start.split() if w.isidentifier() and len(w) > 3]
    changed = start.replace(words[0], words[0] + "_v2", 1) if words else start + " "
    return tokenizer.encode(passage + "\n\n" + changed, add_special_tokens=False)


def prompts_for(workload: str, tokenizer, texts: list[str], args: argparse.Namespace) -> list[list[int]]:
    if workload == "edit":
        return [edit_prompt(tokenizer, t, args.passage_tokens, args.restart_tokens) for t in texts]
    return [tokenizer.encode(t, add_special_tokens=False)[:args.free_prompt_tokens] for t in texts]


def run(llm, prompts: list[list[int]], max_tokens: int, batch_size: int) -> dict[str, Any]:
    """Greedy generation in batches of `batch_size` (all at once per batch); tokens/s over the whole run."""
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    before = llm.engine.get_stats().spec_decode
    outputs: list[list[int]] = []
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        outputs += [out.outputs[0].token_ids for out in llm.generate(batch, params, use_tqdm=False)]
    elapsed_s = time.perf_counter() - started
    after = llm.engine.get_stats().spec_decode
    proposed = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    drafts = after.num_drafts - before.num_drafts
    return {
        "tokens": outputs,
        "output_tokens_per_s": sum(len(o) for o in outputs) / elapsed_s,
        "elapsed_s": elapsed_s,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else None,
        "accepted_per_verification": accepted / drafts if drafts else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a folder written by bench/train_text_model.py")
    parser.add_argument("--k", default="3,5", help="num_speculative_tokens values, comma-separated")
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=8, help="requests per batch-1 workload")
    parser.add_argument("--max-tokens", type=int, default=200)
    # The presets train on 512-token windows: passage + restart + output stay within them.
    parser.add_argument("--passage-tokens", type=int, default=240)
    parser.add_argument("--restart-tokens", type=int, default=24)
    parser.add_argument("--free-prompt-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64", help="the sweep (edit workload); '' skips it")
    parser.add_argument("--sweep-k", type=int, default=None, help="k of the sweep (default: the first --k)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-memory-percent", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pagedserve.engine.llm import LLM

    ks = [int(k) for k in args.k.split(",") if k]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    sweep_k = args.sweep_k or ks[0]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_texts = max([args.num_prompts, *batch_sizes])
    texts = heldout_texts(args.model, num_texts)
    texts = (texts * (num_texts // len(texts) + 1))[:num_texts]
    common = dict(dtype=args.dtype, max_memory_percent=args.max_memory_percent, max_num_seqs=max([64, *batch_sizes]))

    def engine(k: int | None, disable_batch_size: int = 8) -> LLM:
        if k is None:
            return LLM(str(args.model), **common)
        return LLM(str(args.model), **common, speculative_method="ngram", num_speculative_tokens=k,
                   prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max,
                   speculative_disable_batch_size=disable_batch_size)

    # One engine at a time (each sizes its KV cache from the free memory), plain first: outputs to compare.
    workload_prompts = {w: prompts_for(w, tokenizer, texts[:args.num_prompts], args) for w in WORKLOADS}
    sweep_prompts = {b: prompts_for("edit", tokenizer, texts[:b], args) for b in batch_sizes}

    def measure_batch1(llm: LLM) -> dict[str, dict[str, Any]]:
        by_workload = {}
        for workload, prompts in workload_prompts.items():
            run(llm, prompts[:1], 8, 1)  # warm-up: first-use compilation out of the timing
            by_workload[workload] = run(llm, prompts, args.max_tokens, 1)
        return by_workload

    def measure(llm: LLM) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
        by_workload = measure_batch1(llm)
        by_batch = {batch: run(llm, prompts, args.max_tokens, batch) for batch, prompts in sweep_prompts.items()}
        return by_workload, by_batch

    def release(llm: LLM) -> None:
        import gc

        import torch

        llm.engine.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    plain = engine(None)
    base_workloads, base_batches = measure(plain)
    release(plain)
    rows: list[dict[str, Any]] = []
    for workload, base in base_workloads.items():
        rows.append({"workload": workload, "batch": 1, "method": "plain",
                     **{key: value for key, value in base.items() if key != "tokens"}})
    for batch, base in base_batches.items():
        rows.append({"workload": "edit sweep", "batch": batch, "method": "plain",
                     **{key: value for key, value in base.items() if key != "tokens"}})
    for k in ks:
        llm = engine(k, disable_batch_size=max([1, *batch_sizes]))
        by_workload, by_batch = measure(llm) if k == sweep_k else (measure_batch1(llm), {})
        release(llm)
        for workload, result in by_workload.items():
            base = base_workloads[workload]
            equal = sum(a == b for a, b in zip(result.pop("tokens"), base["tokens"]))
            rows.append({"workload": workload, "batch": 1, "method": f"ngram k={k}", **result,
                         "speedup": result["output_tokens_per_s"] / base["output_tokens_per_s"],
                         "outputs_equal": f"{equal}/{len(base['tokens'])}"})
        for batch, result in by_batch.items():
            base = base_batches[batch]
            equal = sum(a == b for a, b in zip(result.pop("tokens"), base["tokens"]))
            rows.append({"workload": "edit sweep", "batch": batch, "method": f"ngram k={k}", **result,
                         "speedup": result["output_tokens_per_s"] / base["output_tokens_per_s"],
                         "outputs_equal": f"{equal}/{len(base['tokens'])}"})

    if args.out is not None:
        args.out.write_text(json.dumps({"model": str(args.model), "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2))

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"{'workload':<11} {'batch':>5} {'method':<10} {'tok/s':>9} {'speedup':>7} {'accept':>7} "
          f"{'acc/verif':>9} {'equal':>6}")
    for row in rows:
        print(f"{row['workload']:<11} {row['batch']:>5} {row['method']:<10} {row['output_tokens_per_s']:>9.1f} "
              f"{fmt(row.get('speedup'), '.2f'):>7} {fmt(row.get('acceptance_rate'), '.2f'):>7} "
              f"{fmt(row.get('accepted_per_verification'), '.2f'):>9} {row.get('outputs_equal', '-'):>6}")


if __name__ == "__main__":
    main()
