"""Issue 29's service bar on CPU: requests for 4 LoRA adapters over 2 engine replicas, the router's adapter hit rate.

Builds a tiny random-weight Llama (tests/tiny_models.py, 2 layers, byte-level BPE tokenizer) and 4 random
rank-8 adapters over all seven projections in PEFT's format (bench/lora_bench.py's `write_adapters`), starts a
local Ray cluster of its own (the tests' harness: 8 logical CPUs, Serve's proxy and Ray's metrics agent on
127.0.0.1), and deploys the real service (`AsyncLLMEngine`, engine core in its own process) with 2 engine
replicas of `--max-loras` (2) device slots each, so no replica can hold all 4 adapters on its device at once.
Three applications, one after the other on the same cluster:

  startup   `lora_modules` names the 4 adapters: every replica registers all 4 at start (none in a device slot
            until a request runs under it), product router
  runtime   LoRA on, no start-up adapters; the 4 loaded through `/v1/load_lora_adapter` (one engine replica
            loads each then; the other loads it when a request for it lands there), product router
  random    as runtime, but the router places each request on a random replica with room
            (tests/serve_app/random_router.py: the product's router with placement by a coin)

Each sends `--num-requests` streamed completions (request i under adapter i mod 4, greedy, EOS ignored,
`--max-tokens` each) at most `--concurrency` at a time, checks each is a 200 with tokens, and reads from Ray's
metrics: the router's `pagedserve_router_lora_affinity` (hit: the replica chosen had the adapter in one of its
device slots by its latest report, or the router had just sent it a request under the adapter), the replicas'
`pagedserve_lora_requests` per adapter and replica (how many replicas served each adapter: 1 is ideal, and
then each replica needs only the device slots of its own adapters) and their `pagedserve_lora_slot_loads`
(adapters copied into a device slot: 4 in all is the floor, one per adapter; more is churn). Random placement
is measured (the random row), not computed: under it every replica ends up serving every adapter.
Before the load, in `startup`, 2 prompts per adapter are sent one at a time and their greedy text must equal
the offline engine's (`LLM(..., lora_modules=...)`, `generate(..., lora=name)`). Prints a table; `--out`
writes JSON. Needs the test extras and a checkout (the tests' harness and random router).

    .venv/bin/python bench/lora_service_bench.py --out /tmp/lora_service.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent / "tests"
sys.path[:0] = [str(BENCH_DIR), str(TESTS_DIR), str(TESTS_DIR / "serve_app")]
from lora_bench import write_adapters  # noqa: E402
from prefix_affinity_bench import router_options  # noqa: E402
from ray_harness import build_app_with, deployed, local_cluster, metric_samples, wait_for  # noqa: E402
from serve_bench import one_request  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

NUM_ADAPTERS = 4
RANK = 8
CHECK_PROMPTS = ["The quick brown fox", "Paged attention stores keys"]
MODES = {
    "startup": ("lora_modules at start-up, product router", None),
    "runtime": ("loaded at run time, product router", None),
    "random": ("loaded at run time, random placement", "random_router:RandomPlacementRouter"),
}


def write_model_and_adapters(folder: Path) -> tuple[str, dict[str, str]]:
    """The tiny Llama's folder and {adapter name: folder}; the adapters' shapes come from the model's config
    (a model on the meta device: write_adapters needs only its modules)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = build_tiny_model("llama", folder / "model", tokenizer="byte-bpe", num_hidden_layers=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return str(model_dir), write_adapters(model, folder / "adapters", NUM_ADAPTERS, RANK)


def scrape(metrics_url: str, application: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of the pagedserve samples Ray's metrics agent exports from the application's
    processes: our metrics carry no application label, so its processes are the workers of Serve's own series
    labelled with it (the cluster still exports the series of applications deleted before)."""
    samples = metric_samples(httpx.get(metrics_url, timeout=10).text)
    workers = {labels.get("WorkerId") for _, labels, _ in samples if labels.get("application") == application}
    return [(name, labels, value) for name, labels, value in samples
            if name.startswith("ray_pagedserve_") and labels.get("WorkerId") in workers]


def affinity_counts(samples: list) -> dict[str, float]:
    counts = {"hit": 0.0, "miss": 0.0}
    for name, labels, value in samples:
        if name == "ray_pagedserve_router_lora_affinity_total" and labels.get("outcome") in counts:
            counts[labels["outcome"]] += value
    return counts


def slot_loads(samples: list) -> dict[str, int]:
    """{replica: adapters copied into its device slots} (the replicas' counter as of their latest stats report)."""
    loads: dict[str, int] = {}
    for name, labels, value in samples:
        if name == "ray_pagedserve_lora_slot_loads_total":
            replica = labels.get("replica", "?")
            loads[replica] = loads.get(replica, 0) + int(value)
    return loads


def lora_requests(samples: list) -> dict[str, dict[str, float]]:
    """{adapter: {replica: finished requests}} (the base model's "" left out)."""
    served: dict[str, dict[str, float]] = {}
    for name, labels, value in samples:
        if name == "ray_pagedserve_lora_requests_total" and labels.get("lora_name") and value:
            by_replica = served.setdefault(labels["lora_name"], {})
            replica = labels.get("replica", "?")
            by_replica[replica] = by_replica.get(replica, 0.0) + value
    return served


class _UnderPrefix:
    """The session serve_bench's `one_request` posts absolute paths on ("/v1/completions"), under the application's
    route prefix (aiohttp's base_url would drop a path for an absolute one)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session, self._base = session, base

    def post(self, path: str, **kwargs: Any) -> Any:
        return self._session.post(self._base + path, **kwargs)


async def send_load(base: str, names: list[str], num_requests: int, concurrency: int, max_tokens: int) -> list:
    """Streamed greedy completions, request i under names[i % len]; prompts differ (no prefix shared across)."""
    results: list = [None] * num_requests
    queue = list(range(num_requests))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        under_prefix = _UnderPrefix(session, base)

        async def worker() -> None:
            while queue:
                index = queue.pop(0)
                prompt = f"Request {index}: adapters share one base model and"
                results[index] = await one_request(under_prefix, names[index % len(names)], prompt, max_tokens, 0.0)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def service_greedy(base: str, names: list[str], max_tokens: int) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for name in names:
        for prompt in CHECK_PROMPTS:
            response = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            response.raise_for_status()
            texts.setdefault(name, []).append(response.json()["choices"][0]["text"])
    return texts


def offline_greedy(model: str, engine_args: dict, adapters: dict[str, str], max_tokens: int
                   ) -> tuple[dict[str, list[str]], list[str]]:
    """Each adapter's greedy text on the check prompts through `LLM`, and the base model's."""
    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.engine.llm import LLM

    llm = LLM(model, **engine_args, lora_modules=adapters)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    try:
        texts = {name: [o.outputs[0].text for o in llm.generate(CHECK_PROMPTS, params, use_tqdm=False, lora=name)]
                 for name in adapters}
        base = [o.outputs[0].text for o in llm.generate(CHECK_PROMPTS, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    return texts, base


def run_mode(cluster, mode: str, model: str, adapters: dict[str, str], app_args: dict, options: argparse.Namespace
             ) -> dict[str, Any]:
    label, router_class = MODES[mode]
    args = {**app_args, **({"lora_modules": adapters} if mode == "startup" else {"enable_lora": True})}
    replica_options = router_options(args, router_class) if router_class else {}
    names = list(adapters)
    started = time.perf_counter()
    with deployed(cluster, f"lora-{mode}", build_app_with(args, **replica_options), timeout_s=240) as base:
        start_s = time.perf_counter() - started
        if mode != "startup":
            for name, path in adapters.items():
                httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                           timeout=120).raise_for_status()
        texts = service_greedy(base, names, options.check_tokens) if mode == "startup" else None
        num_checks = len(names) * len(CHECK_PROMPTS) if texts is not None else 0
        started = time.perf_counter()
        results = asyncio.run(send_load(base, names, options.num_requests, options.concurrency, options.max_tokens))
        load_s = time.perf_counter() - started
        expected = options.num_requests + num_checks

        seen: dict[str, Any] = {}

        def counted() -> bool:
            samples = scrape(cluster.metrics_url, f"lora-{mode}")
            seen.update(affinity=affinity_counts(samples), served=lora_requests(samples), loads=slot_loads(samples))
            # A replica's slot loads reach the scrape with its next stats report: at least one per adapter it served.
            pairs = [replica for by_replica in seen["served"].values() for replica in by_replica]
            return (sum(seen["affinity"].values()) >= expected
                    and sum(sum(r.values()) for r in seen["served"].values()) >= expected
                    and all(seen["loads"].get(replica, 0) >= pairs.count(replica) for replica in set(pairs)))

        wait_for(counted, 30, lambda: f"the metrics of {expected} LoRA requests in lora-{mode} "
                 f"(seen: {seen}; failures: {[r.error for r in results if not r.ok]})", period_s=0.5)
    affinity, served = seen["affinity"], seen["served"]  # as of the scrape that met the counts
    failures = [r.error or "no tokens" for r in results if not r.ok or not r.num_output_tokens]
    return {
        "mode": mode, "label": label, "service_start_s": round(start_s, 1), "load_s": round(load_s, 2),
        "num_requests": len(results), "num_check_requests": num_checks,
        "failures": len(failures), "failure_kinds": sorted(set(failures)),
        "output_tokens": sum(r.num_output_tokens for r in results),
        "affinity": affinity, "hit_rate": affinity["hit"] / max(1.0, affinity["hit"] + affinity["miss"]),
        "requests_per_adapter": {name: int(sum(served.get(name, {}).values())) for name in names},
        "replicas_per_adapter": {name: len(served.get(name, {})) for name in names},
        "slot_loads_by_replica": seen["loads"],
        "adapters_by_replica": {replica: sorted(name for name in names if replica in served.get(name, {}))
                                for replica in sorted({r for by_replica in served.values() for r in by_replica})},
        "service_texts": texts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--check-tokens", type=int, default=12, help="new tokens of the greedy equality check")
    parser.add_argument("--max-loras", type=int, default=2, help="device slots per replica (4 adapters)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    if "startup" not in options.modes:
        parser.error("--modes needs startup (it holds the greedy check)")
    started = time.perf_counter()
    engine_args = {"num_blocks": 128, "block_size": 16, "max_model_len": 256, "max_num_seqs": 16,
                   "max_loras": options.max_loras, "max_lora_rank": RANK}
    app_args = {"num_replicas": 2, "num_cpus_per_replica": 1, "engine_process": True, "max_ongoing_requests": 64,
                "router": {"stats_period_s": 0.5}, **engine_args}
    with tempfile.TemporaryDirectory(prefix="lora-service-bench-") as folder:
        model, adapters = write_model_and_adapters(Path(folder))
        app_args["model"] = model
        offline, base_texts = offline_greedy(model, engine_args, adapters, options.check_tokens)
        runs = []
        with local_cluster() as cluster:
            for mode in options.modes:
                runs.append(run_mode(cluster, mode, model, adapters, app_args, options))
                print(f"{mode}: done in {time.perf_counter() - started:.0f} s", flush=True)
    startup = next(r for r in runs if r["mode"] == "startup")
    mismatches = [f"{name} prompt {i}" for name, texts in offline.items()
                  for i, text in enumerate(texts) if startup["service_texts"][name][i] != text]
    adapters_differ = sum(texts != base_texts for texts in offline.values())
    report = {"args": {k: str(v) for k, v in vars(options).items()}, "engine": engine_args,
              "num_replicas": 2, "num_adapters": NUM_ADAPTERS, "runs": runs,
              "greedy_check": {"prompts": len(CHECK_PROMPTS), "adapters": NUM_ADAPTERS, "mismatches": mismatches,
                               "adapters_whose_text_differs_from_base": adapters_differ},
              "wall_s": round(time.perf_counter() - started, 1)}
    print(f"\n{options.num_requests} streamed requests a run ({options.max_tokens} new tokens, greedy, at most "
          f"{options.concurrency} at once) for {NUM_ADAPTERS} adapters over 2 replicas of {options.max_loras} "
          f"device slots each")
    print("| run | requests ok | per adapter (replicas serving it) | each replica: adapters served (device slot loads) "
          "| slot loads | router hit / miss | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        per_adapter = ", ".join(f"{n} {c} ({run['replicas_per_adapter'][n]})"
                                for n, c in run["requests_per_adapter"].items())
        loads = run["slot_loads_by_replica"]
        by_replica = sorted((",".join(n.removeprefix("adapter-") for n in adapters) or "none", replica)
                            for replica, adapters in {**{r: [] for r in loads}, **run["adapters_by_replica"]}.items())
        print(f"| {run['label']} | {run['num_requests'] - run['failures']}/{run['num_requests']} | {per_adapter} "
              f"| {' / '.join(f'{served_there} ({loads.get(replica, 0)})' for served_there, replica in by_replica)} "
              f"| {sum(loads.values())} | {run['affinity']['hit']:.0f} / "
              f"{run['affinity']['miss']:.0f} | {run['hit_rate']:.3f} |")
    print(f"greedy through the service = offline: {len(offline) * len(CHECK_PROMPTS) - len(mismatches)}/"
          f"{len(offline) * len(CHECK_PROMPTS)} (adapters whose text differs from the base model's: "
          f"{adapters_differ}/{NUM_ADAPTERS}); wall {report['wall_s']} s")
    if options.out is not None:
        options.out.write_text(json.dumps(report, indent=2))
    return 1 if mismatches or any(r["failures"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
