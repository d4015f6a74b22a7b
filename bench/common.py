"""Shared benchmark helpers: a workload of token-id prompts, Poisson arrivals and the goodput SLO, latency
percentiles, peak memory, one result type, tables.

Used by bench/engine_bench.py (CPU, this engine vs transformers' `generate_batch`) and meant for any other
throughput benchmark (a GPU one) that runs several engines on the same `Workload` and prints one table.
Nothing here imports the engine or transformers, so a benchmark worker can import it before choosing what
to load. Times are seconds, memory is bytes, rates are tokens per second.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import random
import subprocess
from collections import defaultdict
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Workload:
    """Prompts as token ids, all submitted at once, each generating exactly `max_new_tokens` (EOS ignored)."""

    prompts: list[list[int]]
    max_new_tokens: int
    seed: int
    description: str

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return self.num_requests * self.max_new_tokens

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Workload:
        return cls(
            prompts=[list(map(int, prompt)) for prompt in payload["prompts"]],
            max_new_tokens=int(payload["max_new_tokens"]),
            seed=int(payload["seed"]),
            description=str(payload["description"]),
        )


def parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    """`--engine-arg key=value` flags as EngineConfig keywords: true/false as booleans, digits as integers, the
    rest as text (EngineConfig validates each as it validates a flag's text)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, value = item.split("=", 1)
        overrides[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return overrides


def random_token_workload(
    num_requests: int,
    min_prompt_len: int,
    max_prompt_len: int,
    max_new_tokens: int,
    vocab_size: int,
    seed: int,
    excluded_token_ids: Sequence[int] = (),
) -> Workload:
    """Prompts of uniformly random lengths in [min_prompt_len, max_prompt_len] of uniformly random token ids.

    `excluded_token_ids` (special tokens) never appear, so no prompt carries a stray BOS or EOS.
    """
    if not 1 <= min_prompt_len <= max_prompt_len:
        raise ValueError(f"prompt lengths must satisfy 1 <= min <= max, got min={min_prompt_len} max={max_prompt_len}")
    if num_requests < 1 or max_new_tokens < 1:
        raise ValueError(f"num_requests={num_requests} and max_new_tokens={max_new_tokens} must be >= 1")
    excluded = set(excluded_token_ids)
    allowed = [token_id for token_id in range(vocab_size) if token_id not in excluded]
    rng = random.Random(seed)
    prompts = [
        [rng.choice(allowed) for _ in range(rng.randint(min_prompt_len, max_prompt_len))] for _ in range(num_requests)
    ]
    description = (
        f"{num_requests} requests, random token ids, prompt length uniform in [{min_prompt_len}, {max_prompt_len}], "
        f"{max_new_tokens} output tokens each (EOS ignored), seed {seed}"
    )
    return Workload(prompts, max_new_tokens, seed, description)


@dataclass(frozen=True)
class LognormalLengths:
    """Token counts drawn from a lognormal distribution, rounded and clipped to [min_len, max_len].

    `mean` is the mean of the distribution before clipping (a clip at the far tail moves it little);
    `sigma` is the standard deviation of the length's logarithm, so the median is mean * exp(-sigma**2 / 2).
    """

    mean: float
    sigma: float
    min_len: int
    max_len: int

    def __post_init__(self) -> None:
        if not self.mean > 0 or not self.sigma >= 0:
            raise ValueError(f"lognormal lengths need mean > 0 and sigma >= 0, got mean={self.mean} sigma={self.sigma}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"lengths must satisfy 1 <= min <= max, got min={self.min_len} max={self.max_len}")

    @property
    def mu(self) -> float:
        """Mean of the length's logarithm."""
        return math.log(self.mean) - self.sigma**2 / 2

    def sample(self, rng: random.Random, max_len: int | None = None) -> int:
        """One length; `max_len` tightens the upper clip for this draw (a context limit), never below min_len."""
        upper = self.max_len if max_len is None else max(self.min_len, min(self.max_len, max_len))
        return min(max(round(rng.lognormvariate(self.mu, self.sigma)), self.min_len), upper)

    def describe(self) -> str:
        return f"lognormal (mean {self.mean:g}, sigma {self.sigma:g}) clipped to [{self.min_len}, {self.max_len}]"


@dataclass(frozen=True)
class VariableLengthWorkload:
    """Prompts as token ids, request i generating exactly `output_lens[i]` tokens (EOS ignored)."""

    prompts: list[list[int]]
    output_lens: list[int]
    seed: int
    description: str


def lognormal_token_workload(
    num_requests: int,
    prompt_lens: LognormalLengths,
    output_lens: LognormalLengths,
    vocab_size: int,
    seed: int,
    max_total_len: int | None = None,
    excluded_token_ids: Sequence[int] = (),
) -> VariableLengthWorkload:
    """Prompts of uniformly random token ids with lognormal prompt and output lengths (a ShareGPT-like shape).

    With `max_total_len` (the served model's context), a prompt is clipped to leave room for the shortest
    output and its output to what the prompt leaves, so that every request fits.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} must be >= 1")
    if max_total_len is not None and max_total_len < prompt_lens.min_len + output_lens.min_len:
        raise ValueError(f"max_total_len={max_total_len} is below the shortest prompt + output "
                         f"({prompt_lens.min_len} + {output_lens.min_len})")
    excluded = set(excluded_token_ids)
    allowed = [token_id for token_id in range(vocab_size) if token_id not in excluded]
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    outputs: list[int] = []
    for _ in range(num_requests):
        prompt_cap = None if max_total_len is None else max_total_len - output_lens.min_len
        prompt_len = prompt_lens.sample(rng, prompt_cap)
        outputs.append(output_lens.sample(rng, None if max_total_len is None else max_total_len - prompt_len))
        prompts.append([rng.choice(allowed) for _ in range(prompt_len)])
    fit = "" if max_total_len is None else f", prompt + output <= {max_total_len}"
    description = (
        f"{num_requests} requests, random token ids, prompt length {prompt_lens.describe()}, output length "
        f"{output_lens.describe()}{fit} (means drawn {sum(map(len, prompts)) / num_requests:.0f} / "
        f"{sum(outputs) / num_requests:.0f}), EOS ignored, seed {seed}"
    )
    return VariableLengthWorkload(prompts, outputs, seed, description)


# ---- online serving: arrivals and the goodput SLO ----------------------------------------------
def poisson_arrivals_s(rate_per_s: float, duration_s: float, max_requests: int | None, seed: int) -> list[float]:
    """Send times from the start of a run: the first at 0, then exponential gaps of mean 1 / rate_per_s.

    Every time is before `duration_s`, and there are at most `max_requests` of them (None: no cap). The same
    seed gives the same times, so passes that compare settings can share one schedule.
    """
    if not rate_per_s > 0 or not duration_s > 0:
        raise ValueError(f"rate_per_s={rate_per_s} and duration_s={duration_s} must be > 0")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests={max_requests} must be >= 1 or None")
    rng = random.Random(seed)
    arrivals_s: list[float] = []
    next_s = 0.0
    while next_s < duration_s and (max_requests is None or len(arrivals_s) < max_requests):
        arrivals_s.append(next_s)
        next_s += rng.expovariate(rate_per_s)
    return arrivals_s


class PassLatencies(Protocol):
    """What `Slo.checks` reads from a pass: latency percentiles in seconds ({"p99": ...}), None where nothing
    was measured."""

    @property
    def ttft_s(self) -> dict[str, float] | None: ...

    @property
    def tpot_s(self) -> dict[str, float] | None: ...

    @property
    def itl_s(self) -> dict[str, float] | None: ...


@dataclass(frozen=True)
class Slo:
    """Goodput objectives on p99s, in seconds. A pass meets them when `meets_slo` holds for its `checks`."""

    ttft_p99_s: float = 1.0
    tpot_p99_s: float = 0.050
    itl_p99_s: float = 0.100

    def checks(self, latencies: PassLatencies) -> dict[str, bool]:
        """Per metric ("TTFT", "TPOT", "ITL"), whether its p99 holds; a metric nothing measured fails."""
        def holds(measured: dict[str, float] | None, limit_s: float) -> bool:
            return measured is not None and measured["p99"] <= limit_s

        return {"TTFT": holds(latencies.ttft_s, self.ttft_p99_s), "TPOT": holds(latencies.tpot_s, self.tpot_p99_s),
                "ITL": holds(latencies.itl_s, self.itl_p99_s)}


def meets_slo(num_sent: int, num_completed: int, checks: Mapping[str, bool]) -> bool:
    """The goodput verdict of a pass: it sent something, every request it sent completed, and every check held."""
    return 0 < num_completed == num_sent and all(checks.values())


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """{"p50": ..., "p90": ..., "p99": ...} in seconds, or None when nothing was measured."""
    if not values:
        return None
    return {f"p{q}": percentile(values, q) for q in PERCENTILES}


@dataclass
class RequestTiming:
    """Per-request times on one clock, in seconds: submitted, first output token, last output token."""

    arrival_s: float
    first_token_s: float
    last_token_s: float
    num_output_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a one-token output."""
        if self.num_output_tokens < 2:
            return None
        return (self.last_token_s - self.first_token_s) / (self.num_output_tokens - 1)


@dataclass
class BenchResult:
    """One engine's run over one workload. Percentile dicts are None where the engine gives no per-token times."""

    engine: str
    num_requests: int
    num_prompt_tokens: int
    num_output_tokens: int
    wall_s: float
    ttft_s: dict[str, float] | None
    tpot_s: dict[str, float] | None
    peak_memory_bytes: int | None
    memory_kind: str  # what peak_memory_bytes measures, e.g. "process peak RSS (VmHWM)" or "torch.cuda max allocated"
    cpu_s: float | None = None  # process CPU time (user + system, all threads) of the timed run
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.num_prompt_tokens + self.num_output_tokens) / self.wall_s

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["output_tokens_per_s"] = self.output_tokens_per_s
        payload["total_tokens_per_s"] = self.total_tokens_per_s
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> BenchResult:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in payload.items() if key in names})


def summarize_timings(timings: Sequence[RequestTiming]) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """(TTFT percentiles, TPOT percentiles) over requests."""
    ttfts = [t.ttft_s for t in timings]
    tpots = [t.tpot_s for t in timings if t.tpot_s is not None]
    return latency_percentiles(ttfts), latency_percentiles(tpots)


# ---- memory ------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (VmHWM) since start or the last `reset_peak_rss`; None off Linux."""
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def current_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


# ---- provenance --------------------------------------------------------------------------------
def release_memory() -> None:
    """After the caller shut an engine down and dropped its last reference to it (`del llm`, and any `engine =
    llm.engine`): its KV cache and graphs freed, so the next engine in the process sizes its cache from the same
    free memory. A reference still held shrinks the next engine's cache, and the run then measures that (two LoRA
    W1 runs did: docs/lora.md)."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def git_commit(repo_dir: Path) -> str:
    """Short commit of `repo_dir`, with "+dirty" when tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=repo_dir, check=False).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine_description() -> str:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    return f"{os.cpu_count()} CPU cores ({cpu_model}){load}"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# ---- tables ------------------------------------------------------------------------------------
def _format_seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _format_bytes(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def comparison_table(results: Sequence[BenchResult], baseline_index: int = -1) -> str:
    """Markdown table: one row per metric, one column per engine, then first engine / baseline engine."""
    if len(results) < 2:
        raise ValueError("a comparison needs at least two results")
    first, baseline = results[0], results[baseline_index]
    rows: list[tuple[str, list[str], str]] = []

    def add(label: str, values: list[float | None], fmt, with_ratio: bool = True) -> None:
        cells = ["n/a" if value is None else fmt(value) for value in values]
        ratio = _ratio(values[0], values[baseline_index]) if with_ratio else ""
        rows.append((label, cells, ratio))

    add("requests", [r.num_requests for r in results], str, with_ratio=False)
    add("prompt tokens", [r.num_prompt_tokens for r in results], str, with_ratio=False)
    add("output tokens", [r.num_output_tokens for r in results], str, with_ratio=False)
    add("wall time", [r.wall_s for r in results], _format_seconds)
    add("process CPU time", [r.cpu_s for r in results], _format_seconds)
    add("output tokens/s", [r.output_tokens_per_s for r in results], lambda v: f"{v:.1f}")
    add("total tokens/s", [r.total_tokens_per_s for r in results], lambda v: f"{v:.1f}")
    for label, attr in (("TTFT", "ttft_s"), ("TPOT", "tpot_s")):
        for q in PERCENTILES:
            values = [(getattr(r, attr) or {}).get(f"p{q}") for r in results]
            add(f"{label} p{q}", values, _format_seconds)
    add("peak memory", [r.peak_memory_bytes for r in results], _format_bytes)

    header = ["metric", *[r.engine for r in results], f"{first.engine} / {baseline.engine}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, cells, ratio in rows:
        lines.append("| " + " | ".join([label, *cells, ratio]) + " |")
    return "\n".join(lines)


async def run_within(coroutines: Sequence[Awaitable[None]], timeout_s: float) -> None:
    """Run the requests' coroutines together for at most `timeout_s`: those unfinished then are cancelled (a
    cancelled stream aborts its request and frees its blocks) and left out; the first error of the others is
    raised."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    _, unfinished = await asyncio.wait(tasks, timeout=timeout_s)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()


# ---- torch.profiler tables ----------------------------------------------------------------------------------
def device_events(prof) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every kernel, copy and set the profiler saw on the device, in start order
    (off CUDA, the CPU ops: only the script itself is being checked)."""
    import torch

    device_type = torch.autograd.DeviceType.CUDA if torch.cuda.is_available() else torch.autograd.DeviceType.CPU
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == device_type)


def kernel_table(events: list[tuple[float, float, str]], num_steps: int) -> list[dict[str, Any]]:
    """Per kernel name: calls and microseconds per step, share of all kernel time, mean microseconds a call.
    (A kernel launched with programmatic dependent launch counts its wait for the one before as its time.)"""
    durations: dict[str, list[float]] = defaultdict(list)
    for start, end, name in events:
        durations[name].append(end - start)
    total = sum(sum(values) for values in durations.values()) or 1.0
    table = [{"name": name, "per_step": len(values) / num_steps, "us_per_step": sum(values) / num_steps,
              "share": sum(values) / total, "mean_us": sum(values) / len(values)} for name, values in durations.items()]
    return sorted(table, key=lambda row: -row["us_per_step"])
