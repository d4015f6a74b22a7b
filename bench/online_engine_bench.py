"""Online serving on one warm engine, without Ray or HTTP: latency at a request rate, per prefill rule.

Chooses the CUDA defaults of `max_prefill_tokens_while_decoding` and `prefill_step_time_ratio`
(config/resolve.py, GPU_MAX_PREFILL_TOKENS_WHILE_DECODING and GPU_PREFILL_STEP_TIME_RATIO). Long prompt
chunks that share a step with decodes stretch that step, and every decoding request waits for it: time per
output token grows with the arrival rate. A bound trades that against time to first token (a prompt takes
more steps beside decodes). A rule (`--prefill-bounds`) is a constant bound (`2048`, `none`) or the step-time
budget `ratio:R` (prompt tokens beside decodes take at most R - 1 decode steps' time, under the constant
bound 2048 and widened for the waiting prompts' `ttft_target_s`: engine/core/scheduler.py), with options
`ratio:R,bound=N|none,ttft=S`. The engine's cost model learns from every pass, so put a constant bound
first: the rule's passes then start from a fitted model (logged at each change). Requests reach
`AsyncLLMEngine` (the engine core in its own process, as a GPU replica runs it) at Poisson times, for
`--duration-s` seconds per pass, then the pass drains. One pass per (rate, rule): the same prompts and
arrival times for every rule at a rate, rules interleaved within a rate; the rule changes between
passes on the one engine (`update_scheduler`), so the model is built and its graphs captured once.

Per request: TTFT (sent -> first delta), TPOT (first -> last delta over the tokens after the first), ITL
(gaps between the deltas the stream yields, pooled over requests). A row meets the goodput SLO when every
request finished and the p99s of all three hold (thresholds as flags). Also per row: output tokens/s
(first send -> last token), the prompt tokens a step took beside decodes, median and most (the rule at work), the
engine's step times by kind (decode-only steps, steps with prompt tokens beside decodes) and the output
tokens a delta carried on average: what the inter-token gaps are made of.
A request unfinished `--max-drain-s` after its pass's arrivals end is aborted and fails the row, which
bounds the run's time when a rate overloads the engine. Prompts: random ids below `--vocab-size`,
lengths uniform in [--min-prompt-len, --max-prompt-len]; outputs of exactly `--max-new-tokens` (EOS
ignored); prefix caching off (the same prompts recur across bounds). Prints each pass as it ends, the
run's time, and a markdown table last; `--out` writes JSON.

The defaults are the GPU run: Llama-3-8B shape (random weights), 4 rates x 5 bounds, 6 s of arrivals
each. A pass lasts its arrivals plus its drain (the last request's 128 tokens: about 1 + 127 x TPOT s,
at most --max-drain-s), so the run takes 20 such passes plus the engine's start (model, compilation,
CUDA graphs); the time so far is printed after every pass. On CPU, a narrow model of the same
vocabulary and a small cache:

    python bench/online_engine_bench.py --out online_engine.json                              # GPU
    python bench/online_engine_bench.py --tiny --layers 2 --num-blocks 1024 --rates 4 8 \\
        --prefill-bounds none 64 256 ratio:2 --duration-s 4 --max-new-tokens 32              # CPU check
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RequestTiming,
    Slo,
    git_commit,
    latency_percentiles,
    machine_description,
    meets_slo,
    poisson_arrivals_s,
    random_token_workload,
    run_within,
    summarize_timings,
    write_json,
)
from gpu_bench import w1_config_and_tokenizer  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent.parent
RATIO_RULE_BOUND = 2048  # a ratio rule's constant bound unless it names one: the CUDA default
DEFAULT_TTFT_TARGET_S = 0.5  # EngineConfig.ttft_target_s's default


@dataclass(frozen=True)
class PrefillRule:
    """What one pass sets on the engine: a constant bound, and the step-time budget's ratio (None: off)."""

    bound: int | None
    ratio: float | None = None
    ttft_target_s: float = DEFAULT_TTFT_TARGET_S

    @property
    def label(self) -> str:
        if self.ratio is None:
            return bound_label(self.bound)
        label = f"ratio:{self.ratio:g}"
        if self.bound != RATIO_RULE_BOUND:
            label += f",bound={bound_label(self.bound)}"
        if self.ttft_target_s != DEFAULT_TTFT_TARGET_S:
            label += f",ttft={self.ttft_target_s:g}"
        return label

    def scheduler_changes(self) -> dict[str, object]:
        return {"max_prefill_tokens_while_decoding": self.bound, "prefill_step_time_ratio": self.ratio,
                "ttft_target_s": self.ttft_target_s}


@dataclass
class PassResult:
    """One (rate, bound) pass. Latency dicts: {"p50", "p90", "p99"} in seconds, None where nothing was measured."""

    rate_per_s: float
    prefill_bound: int | None
    num_sent: int
    num_finished: int
    wall_s: float  # first send -> last token
    num_output_tokens: int
    ttft_s: dict[str, float] | None
    tpot_s: dict[str, float] | None
    itl_s: dict[str, float] | None
    max_send_lag_s: float  # the latest send behind its Poisson time (large: this process, not the engine, set the pace)
    num_steps: int = 0
    max_prefill_tokens_beside_decodes: int = 0
    median_prefill_tokens_beside_decodes: float = 0.0  # over steps with prompt tokens beside decodes
    prefill_step_time_ratio: float | None = None  # the rule's ratio (None: the constant bound alone)
    ttft_target_s: float | None = None  # the rule's deadline, with a ratio
    num_preempted: int = 0
    # Where the inter-token gaps come from: engine step times by kind (seconds, {"p50", "p90", "p99"}), and
    # how many tokens a delta carried on average (above 1: the stream hands over several tokens at a time).
    decode_step_s: dict[str, float] | None = None  # steps with no prompt tokens
    mixed_step_s: dict[str, float] | None = None  # steps with prompt tokens beside decodes
    tokens_per_delta: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def meets_slo(self) -> bool:
        return meets_slo(self.num_sent, self.num_finished, self.checks)

    @property
    def rule_label(self) -> str:
        if self.prefill_step_time_ratio is None:
            return bound_label(self.prefill_bound)
        return PrefillRule(self.prefill_bound, self.prefill_step_time_ratio, self.ttft_target_s).label


def parse_bound(text: str) -> int | None:
    if text.lower() == "none":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a prefill bound is 'none' or an integer >= 1, got {text!r}")
    return value


def bound_label(bound: int | None) -> str:
    return "none" if bound is None else str(bound)


def parse_rule(text: str) -> PrefillRule:
    """'none', an integer bound, or 'ratio:R[,bound=N|none][,ttft=S]'."""
    if not text.lower().startswith("ratio:"):
        return PrefillRule(parse_bound(text))
    ratio_text, *options = text[len("ratio:"):].split(",")
    fields: dict[str, object] = {"bound": RATIO_RULE_BOUND}
    try:
        fields["ratio"] = float(ratio_text)
        for option in options:
            name, _, value = option.partition("=")
            if name == "bound":
                fields["bound"] = parse_bound(value)
            elif name == "ttft":
                fields["ttft_target_s"] = float(value)
            else:
                raise ValueError(option)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a ratio rule is ratio:R[,bound=N|none][,ttft=S], got {text!r}") from None
    if not 1.0 <= fields["ratio"] <= 100.0 or not 0.0 < fields.get("ttft_target_s", 1.0) <= 3600.0:
        raise argparse.ArgumentTypeError(f"ratio in [1, 100] and ttft in (0, 3600] s, got {text!r}")
    return PrefillRule(**fields)


def write_model_dir(path: Path, num_layers: int, tiny: bool) -> None:
    """The Llama-3-8B shape (gpu_bench.py's W1 model), or with `tiny` a narrow one of the same vocabulary
    that a CPU steps through quickly; config and tokenizer only, the engine builds random weights."""
    config, tokenizer = w1_config_and_tokenizer(num_layers)
    if tiny:
        config.hidden_size, config.intermediate_size = 256, 512
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)


async def one_pass(engine, prompts: list[list[int]], arrivals_s: list[float], max_new_tokens: int,
                   max_drain_s: float, tag: str) -> tuple[list[RequestTiming], list[float], int, float, float]:
    """Send prompt i at arrivals_s[i]; return the finished requests' timings, every inter-delta gap, the
    number sent, the latest send lag and the wall time (first send -> last token)."""
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_new_tokens, ignore_eos=True)
    started = time.perf_counter()
    timings: list[RequestTiming] = []
    gaps_s: list[float] = []
    lags_s: list[float] = []

    async def one(index: int) -> None:
        await asyncio.sleep(max(0.0, started + arrivals_s[index] - time.perf_counter()))
        sent = time.perf_counter()
        lags_s.append(sent - started - arrivals_s[index])
        first = last = None
        num_tokens = 0
        own_gaps: list[float] = []
        async for delta in engine.generate(prompts[index], params, f"{tag}-{index}"):
            now = time.perf_counter()
            if last is not None:
                own_gaps.append(now - last)
            num_tokens += len(delta.outputs[0].token_ids)
            first = now if first is None else first
            last = now
        timings.append(RequestTiming(sent, first, last, num_tokens))
        gaps_s.extend(own_gaps)  # only a finished request's gaps count

    await run_within([one(i) for i in range(len(prompts))], arrivals_s[-1] + max_drain_s)
    wall_s = max((t.last_token_s for t in timings), default=started) - started
    return timings, gaps_s, len(lags_s), max(lags_s, default=0.0), wall_s


def run_pass(engine, steps: list, prompts: list[list[int]], arrivals_s: list[float], rate: float,
             rule: PrefillRule, args: argparse.Namespace, slo: Slo, tag: str) -> PassResult:
    steps.clear()
    timings, gaps_s, num_sent, max_lag_s, wall_s = asyncio.run(
        one_pass(engine, prompts, arrivals_s, args.max_new_tokens, args.max_drain_s, tag))
    ttft, tpot = summarize_timings(timings)
    itl = latency_percentiles(gaps_s)
    beside_decodes = [s.num_prefill_tokens for s in steps if s.num_decode_tokens]
    with_prompt = sorted(n for n in beside_decodes if n)
    num_deltas = len(gaps_s) + len(timings)  # a finished stream's first delta opens no gap
    result = PassResult(
        rate_per_s=rate, prefill_bound=rule.bound, num_sent=num_sent, num_finished=len(timings), wall_s=wall_s,
        num_output_tokens=sum(t.num_output_tokens for t in timings), ttft_s=ttft, tpot_s=tpot, itl_s=itl,
        max_send_lag_s=max_lag_s, num_steps=len(steps), max_prefill_tokens_beside_decodes=max(beside_decodes, default=0),
        median_prefill_tokens_beside_decodes=with_prompt[len(with_prompt) // 2] if with_prompt else 0,
        prefill_step_time_ratio=rule.ratio, ttft_target_s=rule.ttft_target_s if rule.ratio is not None else None,
        num_preempted=sum(s.num_preempted for s in steps),
        decode_step_s=latency_percentiles([s.step_time_s for s in steps if not s.num_prefill_tokens]),
        mixed_step_s=latency_percentiles([s.step_time_s for s in steps if s.num_prefill_tokens and s.num_decode_tokens]),
        tokens_per_delta=sum(t.num_output_tokens for t in timings) / num_deltas if num_deltas else 0.0,
    )
    result.checks = slo.checks(result)
    return result


def _ms(latency: dict[str, float] | None, key: str) -> str:
    return "n/a" if latency is None else f"{latency[key] * 1000:.1f}"


def _ratio(top: dict[str, float] | None, bottom: dict[str, float] | None, key: str) -> str:
    return "n/a" if top is None or bottom is None or not bottom[key] else f"{top[key] / bottom[key]:.2f}"


def table(results: list[PassResult], slo: Slo) -> str:
    header = ["rate (req/s)", "prefill rule", "finished", "output tok/s", "TTFT p50 / p99 (ms)",
              "TPOT p50 / p99 (ms)", "ITL p50 / p99 (ms)", "decode step p50 / p99 (ms)",
              "mixed step p50 / p99 (ms)", "tokens a delta", "prompt tokens beside decodes p50 / most", "preempted",
              "ITL / TPOT p50 / p99",
              f"SLO (TTFT {slo.ttft_p99_s * 1000:g} / TPOT {slo.tpot_p99_s * 1000:g} / ITL {slo.itl_p99_s * 1000:g} ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
    for r in results:
        missed = [name for name, holds in r.checks.items() if not holds]
        if r.num_finished < r.num_sent:
            missed.insert(0, "unfinished")
        verdict = "yes" if r.meets_slo else "no (" + ", ".join(missed) + ")"
        lines.append("| " + " | ".join([
            f"{r.rate_per_s:g}", r.rule_label, f"{r.num_finished}/{r.num_sent}",
            f"{r.output_tokens_per_s:.0f}", f"{_ms(r.ttft_s, 'p50')} / {_ms(r.ttft_s, 'p99')}",
            f"{_ms(r.tpot_s, 'p50')} / {_ms(r.tpot_s, 'p99')}", f"{_ms(r.itl_s, 'p50')} / {_ms(r.itl_s, 'p99')}",
            f"{_ms(r.decode_step_s, 'p50')} / {_ms(r.decode_step_s, 'p99')}",
            f"{_ms(r.mixed_step_s, 'p50')} / {_ms(r.mixed_step_s, 'p99')}", f"{r.tokens_per_delta:.2f}",
            f"{r.median_prefill_tokens_beside_decodes:.0f} / {r.max_prefill_tokens_beside_decodes}",
            str(r.num_preempted), f"{_ratio(r.itl_s, r.tpot_s, 'p50')} / {_ratio(r.itl_s, r.tpot_s, 'p99')}", verdict,
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[20.0, 30.0, 40.0, 45.0], help="requests/s")
    parser.add_argument("--prefill-bounds", type=parse_rule, nargs="+",
                        default=[parse_rule(text) for text in ("none", "512", "1024", "2048", "4096")],
                        help="prefill rules, one pass each per rate: max_prefill_tokens_while_decoding ('none' or "
                        "an integer), or the step-time budget 'ratio:R[,bound=N|none][,ttft=S]' (bound 2048 and "
                        "ttft_target_s 0.5 unless named)")
    parser.add_argument("--duration-s", type=float, default=6.0, help="arrivals of one pass; then it drains")
    parser.add_argument("--max-drain-s", type=float, default=10.0,
                        help="requests unfinished this long after a pass's arrivals end are aborted and fail the "
                        "row; 10 s: such a request missed TTFT 1 s or TPOT 71 ms itself (128 tokens)")
    parser.add_argument("--min-prompt-len", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=128000, help="prompt ids are drawn below this")
    parser.add_argument("--slo-ttft-p99-s", type=float, default=1.0)
    parser.add_argument("--slo-tpot-p99-ms", type=float, default=50.0)
    parser.add_argument("--slo-itl-p99-ms", type=float, default=100.0)
    parser.add_argument("--layers", type=int, default=32, help="32 is Llama-3-8B")
    parser.add_argument("--tiny", action="store_true", help="a narrow model of the same vocabulary (CPU checks)")
    parser.add_argument("--max-num-seqs", type=int, default=512, help="512: as bench/serve_w1_gpu.yaml serves W1")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default: the engine's auto")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="KV blocks; default: sized from memory (on CPU, keep it small: the reference "
                        "attention's decode gathers cost with the cache's size)")
    parser.add_argument("--no-engine-process", dest="engine_process", action="store_false",
                        help="the step loop on a thread of this process instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # The engine's own lines (its resolved settings, and at each change of rule its step cost model as fitted so
    # far: what the budget predicts from) go with the passes.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("pagedserve").setLevel(logging.INFO)
    slo = Slo(args.slo_ttft_p99_s, args.slo_tpot_p99_ms / 1000, args.slo_itl_p99_ms / 1000)

    from pagedserve.engine.async_engine import AsyncLLMEngine

    run_started = time.perf_counter()
    model_dir = Path(tempfile.mkdtemp(prefix="online-model-"))
    write_model_dir(model_dir, args.layers, args.tiny)
    engine = AsyncLLMEngine.from_kwargs(
        model=str(model_dir), load_format="dummy", device=args.device, max_num_seqs=args.max_num_seqs,
        max_batch_tokens=args.max_batch_tokens, num_blocks=args.num_blocks, enable_prefix_caching=False,
        engine_process=args.engine_process,
    )
    print(f"engine start: {time.perf_counter() - run_started:.1f} s (engine process: {args.engine_process})",
          flush=True)
    steps: list = []
    engine.add_step_listener(lambda step, stats: steps.append(step))
    results: list[PassResult] = []
    try:
        # Warm-up, as async_w1.py: mixed prompt and decode steps before any clock.
        warm = random_token_workload(8, args.min_prompt_len, args.max_prompt_len, 4, args.vocab_size, seed=99)
        asyncio.run(one_pass(engine, warm.prompts, [0.05 * i for i in range(8)], 4, 60.0, "warm"))
        for rate_index, rate in enumerate(args.rates):
            arrivals_s = poisson_arrivals_s(rate, args.duration_s, None, seed=args.seed + 1000 * rate_index + 1)
            workload = random_token_workload(len(arrivals_s), args.min_prompt_len, args.max_prompt_len,
                                             args.max_new_tokens, args.vocab_size, seed=args.seed + 1000 * rate_index)
            for rule_index, rule in enumerate(args.prefill_bounds):
                engine.update_scheduler(**rule.scheduler_changes())
                tag = f"r{rate_index}-p{rule_index}"
                result = run_pass(engine, steps, workload.prompts, arrivals_s, rate, rule, args, slo, tag)
                results.append(result)
                print(f"--- {rate:g} req/s, prefill rule {rule.label}: {result.num_finished}/{result.num_sent} "
                      f"finished, TTFT / TPOT / ITL p99 {_ms(result.ttft_s, 'p99')} / {_ms(result.tpot_s, 'p99')} / "
                      f"{_ms(result.itl_s, 'p99')} ms, TPOT / ITL p50 {_ms(result.tpot_s, 'p50')} / "
                      f"{_ms(result.itl_s, 'p50')} ms, prompt tokens beside decodes p50 "
                      f"{result.median_prefill_tokens_beside_decodes:.0f}, "
                      f"send lag at most {result.max_send_lag_s * 1000:.0f} ms, "
                      f"SLO {'met' if result.meets_slo else 'missed'} "
                      f"({time.perf_counter() - run_started:.0f} s so far)", flush=True)
    finally:
        engine.shutdown()
    total_s = time.perf_counter() - run_started
    description = (f"Poisson arrivals for {args.duration_s:g} s per pass (drain at most {args.max_drain_s:g} s), "
                   f"prompt length uniform in [{args.min_prompt_len}, {args.max_prompt_len}] random ids, "
                   f"{args.max_new_tokens} output tokens (EOS ignored), {'tiny' if args.tiny else 'Llama-3-8B'} "
                   f"shape with {args.layers} layers, max_num_seqs {args.max_num_seqs}, prefix caching off")
    if args.out:
        write_json(args.out, {"workload": description, "commit": git_commit(REPO_DIR), "machine": machine_description(),
                              "slo": asdict(slo), "total_s": total_s,
                              "passes": [{**asdict(r), "output_tokens_per_s": r.output_tokens_per_s,
                                          "meets_slo": r.meets_slo} for r in results]})
    print(f"\n{description}; whole run {total_s:.0f} s\n")
    print(table(results, slo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
