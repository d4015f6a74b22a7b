"""Speculative decoding (ngram, and draft with `--draft-model`) against plain decoding on a model trained on text
(bench/train_text_model.py; its `--preset draft --distill-from TARGET` trains a draft model on the target's
predictions over the same text, with its tokenizer).

Random weights accept nothing, so this needs a trained folder (its `heldout.jsonl` gives the texts). Two
workloads at batch 1, greedy, each request alone:
- edit: the prompt holds a held-out passage, then the passage's first lines again with one change (a word
  replaced); the model continues copying the passage, which prompt lookup proposes;
- free: the first tokens of a held-out file, then free generation.
For each: output tokens/s plain and with ngram, the speed-up, the acceptance rate (accepted / proposed)
and mean accepted tokens per verification, the median host time of a plain step and of a verification step
(a verification step waits for its tokens), and whether the outputs were equal token for token. Verification
steps replay graphs of k + 1 rows a sequence (engine/runner/cuda_graphs.py); the table says how many did.

Then where speculation stops paying, and whether the adaptive rule (`speculative_adaptive`, engine/spec/adaptive.py)
finds it: a batch sweep on the edit workload (`--batch-sizes`, 1..64 at once) and a W1-like run (`--w1-requests`
free-generation requests of 64-256 prompt tokens submitted at once, at most `max_num_seqs` = the largest batch
running), each plain, with the rule (the sweep's method) and with the constant rule (every request speculates:
`speculative_adaptive=False`), both with `speculative_disable_batch_size` = the largest batch so that the bound
decides nothing. Each row also says the share of steps that speculated, the requests the rule held back, and the
verifications launched before the one before them had delivered ("piped") with the requests whose rows in them were
dropped on a wrong guess ("voided": engine/core/llm_engine.py, `_pipelined_step`); the first n-gram k runs the
batch-1 workloads once more with `speculative_pipelining=False` (method "... serial"). Last,
the W1-like run as a user gets it: the rule with the product's default `speculative_disable_batch_size` (its row
says "bound N"); the issue's target is that row: at most 3% below plain with speculation on. After each engine,
the step cost model's fitted coefficients (what the rule decided by) are printed.

Equality: plain and speculative decoding compute each token from the same tokens at the same positions, but
through other kernels (k + 1 rows a sequence: the multi-row GEMMs and the prefill attention tiles, where a
decode step takes the one-row GEMM and the split-KV decode kernel), so in bf16 a near-tie can flip and the
outputs part from there. A parity pass (edit workload, batch 1, top-2 logprobs) says, for each output that
differs, where, and the plain run's gap between its top two logprobs there: a gap of bf16 rounding size is a
near-tie, a large one a bug. With `--dtype float32` the outputs are expected to be equal.

    python bench/spec_bench.py --model /tmp/target --k 3,5 --out spec.json
    python bench/spec_bench.py --model /tmp/target --k 3 --draft-model /tmp/draft --draft-k 3,5 --batch-sizes 1,4,16
    python bench/spec_bench.py --model /tmp/target --k 3 --dtype float32 --batch-sizes '' --w1-requests 0 \
        --max-tokens 100

A table comes last; `--out` writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import release_memory  # noqa: E402

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


def w1_prompts(tokenizer, texts: list[str], num: int, shortest: int, longest: int) -> list[list[int]]:
    """`num` free-generation prompts of shortest..longest tokens (spread evenly), from the texts' starts and, once
    every text has given one, from further into them (so that no two are the same)."""
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    prompts = []
    for index in range(num):
        ids = encoded[index % len(encoded)]
        length = shortest + (index * 37) % (longest - shortest + 1)
        offset = min((index // len(encoded)) * 16, max(0, len(ids) - length))
        prompts.append(ids[offset:offset + length])
    return prompts


def prompts_for(workload: str, tokenizer, texts: list[str], args: argparse.Namespace) -> list[list[int]]:
    if workload == "edit":
        return [edit_prompt(tokenizer, t, args.passage_tokens, args.restart_tokens) for t in texts]
    return [tokenizer.encode(t, add_special_tokens=False)[:args.free_prompt_tokens] for t in texts]


class StepTimer:
    """Wall time of each `engine.step()`, by kind: steps that verified proposals and the others; and how many
    verification steps replayed a graph. Reads the engine's counters directly (no `get_stats()` a step)."""

    def __init__(self, llm) -> None:
        engine = self.engine = llm.engine
        self.times_s: dict[str, list[float]] = {"plain": [], "verify": []}
        self.num_verify_replays = 0
        step = engine.step
        # The speculator's live counters (None: the plain engine, whose steps are all plain).
        counts = engine._speculator.stats if engine._speculator is not None else None

        def timed_step():
            drafts_before = counts.num_drafts if counts is not None else 0
            started = time.perf_counter()
            outputs = step()
            kind = "verify" if counts is not None and counts.num_drafts != drafts_before else "plain"
            self.times_s[kind].append(time.perf_counter() - started)
            return outputs

        engine.step = timed_step
        graphs = engine.runner._verify_graphs
        if graphs is not None:
            replay = graphs.run

            def counted(step_input, previous_tokens=None):
                self.num_verify_replays += 1
                return replay(step_input, previous_tokens)

            graphs.run = counted

    def take(self) -> dict[str, Any]:
        """Counts and median step times since the last call."""
        figures = {f"{kind}_steps": len(times) for kind, times in self.times_s.items()}
        figures |= {f"{kind}_step_ms": statistics.median(times) * 1e3 if times else None
                    for kind, times in self.times_s.items()}
        figures["verify_steps_in_graphs"] = self.num_verify_replays
        self.times_s = {kind: [] for kind in self.times_s}
        self.num_verify_replays = 0
        return figures


def run(llm, prompts: list[list[int]], max_tokens: int, batch_size: int, timer: StepTimer,
        logprobs: int | None = None) -> dict[str, Any]:
    """Greedy generation in batches of `batch_size` (all at once per batch); tokens/s over the whole run."""
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    before = llm.engine.get_stats()
    outputs: list[list[int]] = []
    top2: list[list[list[float]]] = []  # per output, per token: its top-2 logprobs (with `logprobs`)
    timer.take()
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        for out in llm.generate(batch, params, use_tqdm=False):
            outputs.append(out.outputs[0].token_ids)
            if logprobs is not None:
                top2.append([sorted((lp.logprob for lp in entry.values()), reverse=True)[:2]
                             for entry in out.outputs[0].logprobs])
    elapsed_s = time.perf_counter() - started
    after_stats = llm.engine.get_stats()
    after, spec_before = after_stats.spec_decode, before.spec_decode
    proposed = after.num_draft_tokens - spec_before.num_draft_tokens
    accepted = after.num_accepted_tokens - spec_before.num_accepted_tokens
    drafts = after.num_drafts - spec_before.num_drafts
    # What decided the steps: the share that speculated, and the adaptive rule's choices.
    decisions = {name: getattr(after, name) - getattr(spec_before, name) for name in (
        "num_spec_steps", "num_plain_steps_by_rule", "num_steps_without_proposals", "num_steps_over_batch_size",
        "num_requests_held_back", "num_probes", "num_shadow_trials", "num_pipelined_steps", "num_pipelined_voids")}
    num_steps = after_stats.num_steps_total - before.num_steps_total
    return {
        "tokens": outputs,
        "top2": top2,
        "output_tokens_per_s": sum(len(o) for o in outputs) / elapsed_s,
        "elapsed_s": elapsed_s,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else None,
        "accepted_per_verification": accepted / drafts if drafts else None,
        "steps": num_steps,
        "spec_step_share": decisions["num_spec_steps"] / num_steps if num_steps else None,
        **decisions,
        **timer.take(),
    }


def divergences(spec: dict[str, Any], plain: dict[str, Any]) -> list[dict[str, Any]]:
    """For each output that differs from plain: the first differing token and both runs' top-2 logprob gaps."""
    found = []
    for index, (got, want) in enumerate(zip(spec["tokens"], plain["tokens"])):
        if got == want:
            continue
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))

        def gap(top2: list[list[float]]) -> float | None:
            return top2[at][0] - top2[at][1] if at < len(top2) and len(top2[at]) == 2 else None

        found.append({"prompt": index, "first_difference": at, "plain_top2_gap": gap(plain["top2"][index]),
                      "spec_top2_gap": gap(spec["top2"][index])})
    return found


def dynamo_graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a folder written by bench/train_text_model.py")
    parser.add_argument("--k", default="3,5", help="ngram: num_speculative_tokens values, comma-separated ('' none)")
    parser.add_argument("--draft-model", type=Path, default=None, help="a draft model (train_text_model.py --preset "
                        "draft --distill-from the target): also measure speculative_method='draft'")
    parser.add_argument("--draft-k", default="3", help="draft: num_speculative_tokens values, comma-separated")
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
    parser.add_argument("--w1-requests", type=int, default=256, help="the W1-like run: free-generation requests "
                        "submitted at once, at most the largest batch running (0 skips it)")
    parser.add_argument("--w1-prompt-tokens", default="64,256", help="the W1-like run: shortest,longest prompt")
    parser.add_argument("--w1-max-tokens", type=int, default=192)
    parser.add_argument("--no-constant-rule", action="store_true", help="skip the sweep and W1-like run with the "
                        "constant rule (speculative_adaptive=False)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-memory-percent", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from pagedserve.engine.llm import LLM

    ks = [int(k) for k in args.k.split(",") if k]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    draft_ks = [int(k) for k in args.draft_k.split(",") if k] if args.draft_model is not None else []
    sweep_k = args.sweep_k or (ks or draft_ks)[0]
    # (method, k): the sweep runs for the first n-gram one at sweep_k (the first draft one without n-gram).
    methods = [("ngram", k) for k in ks] + [("draft", k) for k in draft_ks]
    sweep_method = next(m for m in methods if m[1] == sweep_k)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_texts = max([args.num_prompts, *batch_sizes])
    texts = heldout_texts(args.model, num_texts)
    texts = (texts * (num_texts // len(texts) + 1))[:num_texts]
    max_batch = max([64, *batch_sizes])
    common = dict(dtype=args.dtype, max_memory_percent=args.max_memory_percent, max_num_seqs=max_batch)

    def engine(method: str | None, k: int = 0, disable_batch_size: int | None = 8, adaptive: bool = True,
               pipelining: bool = True) -> LLM:
        """`disable_batch_size` None: the product's default bound."""
        if method is None:
            return LLM(str(args.model), **common)
        speculative = dict(num_speculative_tokens=k, speculative_adaptive=adaptive, speculative_pipelining=pipelining)
        if disable_batch_size is not None:
            speculative["speculative_disable_batch_size"] = disable_batch_size
        if method == "draft":
            return LLM(str(args.model), **common, speculative_method="draft", speculative_model=str(args.draft_model),
                       **speculative)
        return LLM(str(args.model), **common, speculative_method="ngram", prompt_lookup_min=args.prompt_lookup_min,
                   prompt_lookup_max=args.prompt_lookup_max, **speculative)

    # One engine at a time (each sizes its KV cache from the free memory), plain first: outputs to compare.
    workload_prompts = {w: prompts_for(w, tokenizer, texts[:args.num_prompts], args) for w in WORKLOADS}
    sweep_prompts = {b: prompts_for("edit", tokenizer, texts[:b], args) for b in batch_sizes}
    shortest, longest = (int(n) for n in args.w1_prompt_tokens.split(","))
    w1 = w1_prompts(tokenizer, texts, args.w1_requests, shortest, longest) if args.w1_requests else []
    cost_models: dict[str, list[str]] = {}  # engine -> the step cost model's fit after each phase

    def measure(llm: LLM, name: str, sweep: bool) -> dict[str, Any]:
        """Batch-1 workloads, the parity pass, the sweep and the W1-like run if asked; the graphs torch.compile made
        meanwhile; the step cost model's fit after each phase."""
        timer = StepTimer(llm)
        compiled_before = dynamo_graphs_compiled()
        fits = cost_models[name] = []

        def fitted(phase: str) -> None:
            fits.append(f"{phase}: {llm.engine.scheduler.step_costs.describe()}")
            print(f"[{name}] {fits[-1]}", flush=True)

        by_workload = {}
        for workload, prompts in workload_prompts.items():
            run(llm, prompts[:1], 8, 1, timer)  # warm-up: first-use compilation out of the timing
            by_workload[workload] = run(llm, prompts, args.max_tokens, 1, timer)
        parity = run(llm, workload_prompts["edit"], args.max_tokens, 1, timer, logprobs=2)
        fitted("batch 1")
        by_batch = {}
        if sweep:
            by_batch = {batch: run(llm, prompts, args.max_tokens, batch, timer)
                        for batch, prompts in sweep_prompts.items()}
            fitted("sweep")
            if w1:
                by_batch["W1-like"] = run(llm, w1, args.w1_max_tokens, len(w1), timer)
                fitted("W1-like")
        return {"workloads": by_workload, "parity": parity, "batches": by_batch,
                "graphs_compiled": dynamo_graphs_compiled() - compiled_before}

    rows: list[dict[str, Any]] = []
    parity: list[dict[str, Any]] = []
    compiles: dict[str, int] = {}

    def save() -> None:  # after every engine: a run cut short keeps what it measured
        if args.out is not None:
            args.out.write_text(json.dumps({"model": str(args.model), "args": {k: str(v) for k, v in vars(args).items()},
                                            "rows": rows, "parity": parity, "graphs_compiled": compiles,
                                            "step_cost_models": cost_models}, indent=2))

    def figures(result: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in result.items() if key not in ("tokens", "top2")}

    def sweep_row(batch: int | str) -> tuple[str, int]:
        """(workload, batch) of a sweep entry: the W1-like run's batch is the largest that runs."""
        return ("W1-like", max_batch) if batch == "W1-like" else ("edit sweep", batch)

    plain = engine(None)
    base = measure(plain, "plain", sweep=True)
    plain.engine.shutdown()
    del plain  # the last reference: the next engine sizes its cache from the memory this one frees
    release_memory()
    compiles["plain"] = base["graphs_compiled"]
    for workload, result in base["workloads"].items():
        rows.append({"workload": workload, "batch": 1, "method": "plain", **figures(result)})
    for batch, result in base["batches"].items():
        rows.append({"workload": sweep_row(batch)[0], "batch": sweep_row(batch)[1], "method": "plain",
                     **figures(result)})
    save()
    # (method, k, adaptive, pipelining): each with the rule; the sweep's method again with the constant rule; the
    # first n-gram k again without pipelined verifications (batch-1 workloads only: what pipelining gives).
    runs = [(method_name, k, True, True) for method_name, k in methods]
    if not args.no_constant_rule and (batch_sizes or w1):
        runs.insert(methods.index(sweep_method) + 1, (*sweep_method, False, True))
    if ks:
        runs.insert(1, ("ngram", ks[0], True, False))
    for method_name, k, adaptive, pipelining in runs:
        llm = engine(method_name, k, disable_batch_size=max_batch, adaptive=adaptive, pipelining=pipelining)
        method = f"{method_name} k={k}" + ("" if adaptive else " const") + ("" if pipelining else " serial")
        spec = measure(llm, method, sweep=(method_name, k) == sweep_method and pipelining)
        llm.engine.shutdown()
        del llm
        release_memory()
        compiles[method] = spec["graphs_compiled"]
        for (workload, batch), result, reference in (
                [((w, 1), r, base["workloads"][w]) for w, r in spec["workloads"].items()]
                + [(sweep_row(b), r, base["batches"][b]) for b, r in spec["batches"].items()]):
            equal = sum(a == b for a, b in zip(result["tokens"], reference["tokens"]))
            rows.append({"workload": workload, "batch": batch, "method": method, **figures(result),
                         "speedup": result["output_tokens_per_s"] / reference["output_tokens_per_s"],
                         "outputs_equal": f"{equal}/{len(reference['tokens'])}"})
        parity.append({"method": method, "equal": sum(a == b for a, b in zip(spec["parity"]["tokens"],
                                                                              base["parity"]["tokens"])),
                       "of": len(base["parity"]["tokens"]), "divergences": divergences(spec["parity"], base["parity"])})
        save()

    if w1:
        # The W1-like run as a user gets it: the rule with the product's default bound on the batch (the runs above
        # lift the bound so that the rule alone decides). Issue 27's bar: at most 3% below plain.
        from pagedserve.config.engine import EngineConfig

        bound = EngineConfig.model_fields["speculative_disable_batch_size"].default
        llm = engine(*sweep_method, disable_batch_size=None)
        method = f"{sweep_method[0]} k={sweep_method[1]} bound {bound}"
        timer = StepTimer(llm)
        run(llm, w1[:4], 8, 4, timer)  # warm-up
        result = run(llm, w1, args.w1_max_tokens, len(w1), timer)
        llm.engine.shutdown()
        del llm
        release_memory()
        reference = base["batches"]["W1-like"]
        equal = sum(a == b for a, b in zip(result["tokens"], reference["tokens"]))
        rows.append({"workload": "W1-like", "batch": max_batch, "method": method, **figures(result),
                     "speedup": result["output_tokens_per_s"] / reference["output_tokens_per_s"],
                     "outputs_equal": f"{equal}/{len(reference['tokens'])}"})
        save()

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"{'workload':<11} {'batch':>5} {'method':<16} {'tok/s':>9} {'speedup':>7} {'accept':>7} "
          f"{'acc/verif':>9} {'spec%':>6} {'held':>6} {'shadow':>6} {'piped':>6} {'voided':>6} {'equal':>7} "
          f"{'plain ms':>8} {'verif ms':>8} {'in graphs':>11}")
    for row in rows:
        print(f"{row['workload']:<11} {row['batch']:>5} {row['method']:<16} {row['output_tokens_per_s']:>9.1f} "
              f"{fmt(row.get('speedup'), '.2f'):>7} {fmt(row.get('acceptance_rate'), '.2f'):>7} "
              f"{fmt(row.get('accepted_per_verification'), '.2f'):>9} {fmt(row.get('spec_step_share'), '.0%'):>6} "
              f"{row.get('num_requests_held_back', 0):>6} {row.get('num_shadow_trials', 0):>6} "
              f"{row.get('num_pipelined_steps', 0):>6} {row.get('num_pipelined_voids', 0):>6} "
              f"{row.get('outputs_equal', '-'):>7} "
              f"{fmt(row['plain_step_ms'], '.2f'):>8} {fmt(row['verify_step_ms'], '.2f'):>8} "
              f"{row['verify_steps_in_graphs']:>5}/{row['verify_steps']:<5}")
    # The crossover: speed-up over plain by batch, with the adaptive rule and with the constant one.
    sweep_rows = [row for row in rows if row["workload"] in ("edit sweep", "W1-like") and row["method"] != "plain"]
    if sweep_rows:
        adaptive_name = f"{sweep_method[0]} k={sweep_method[1]}"
        print(f"\ncrossover ({adaptive_name}): speed-up over plain, share of steps speculating")
        print(f"{'workload':<11} {'batch':>5} {'rule':>13} {'constant':>13}")
        for workload, batch in dict.fromkeys((row["workload"], row["batch"]) for row in sweep_rows):
            cells = []
            for method in (adaptive_name, adaptive_name + " const"):
                row = next((r for r in sweep_rows if (r["workload"], r["batch"], r["method"]) == (workload, batch,
                                                                                                    method)), None)
                cells.append("-" if row is None else
                             f"{row['speedup']:.2f} {fmt(row['spec_step_share'], '.0%'):>5}")
            print(f"{workload:<11} {batch:>5} {cells[0]:>13} {cells[1]:>13}")
    print("\nstep cost models (the rule's costs), after each phase:")
    for name, fits in cost_models.items():
        for fit in fits:
            print(f"  {name}, {fit}")
    print(f"dtype {args.dtype}; graphs torch.compile made during the measured runs (warm-ups included): {compiles}")
    for entry in parity:
        print(f"parity ({entry['method']}, edit, batch 1, top-2 logprobs): {entry['equal']}/{entry['of']} equal")
        for found in entry["divergences"]:
            print(f"  prompt {found['prompt']}: first difference at output token {found['first_difference']}, "
                  f"top-2 logprob gap there: plain {fmt(found['plain_top2_gap'], '.4f')}, "
                  f"speculative {fmt(found['spec_top2_gap'], '.4f')}")


if __name__ == "__main__":
    main()
