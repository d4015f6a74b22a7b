"""Issue 28's prefix-affinity bar through Ray: two replicas, a shared-prefix workload, the replicas' prefix-cache
hit rate with the product's router against the same router placing each request on a random replica with room.

Runs the service with the fake engine of the tests (tests/serve_app/fake_engine.py: no model, real KV-block
accounting, and a model of the prefix cache: prompts' full blocks under the cache's chained hashes, least
recently used evicted past the replica's blocks) on a local Ray cluster of the tests' harness, so it needs the
test extras and a checkout. The workload (tests/serve_app/prefix_workload.py): ten 192-token prefixes visited
three times in turn, about twice what one replica caches. Sends the requests one at a time and prints one row
per router, with the hit rate random routing gets on the same prompts replayed through the cache model.

    .venv/bin/python bench/prefix_affinity_bench.py [--affinity-tolerance 0.1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS_DIR), str(TESTS_DIR / "serve_app")]
import prefix_workload  # noqa: E402
from ray_harness import fake_engine_app, local_cluster  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

ROUTERS = {"free blocks + prefix affinity (product)": None,
           "random among replicas with room": "random_router:RandomPlacementRouter"}


def router_options(args: dict, router_class: str) -> dict:
    """Engine-replica deployment options that route with `router_class` under the product's router settings for
    the app `args` (for ray_harness's `build_app_with` / `fake_engine_app`)."""
    from pagedserve.config.serve import ServeArgs
    from pagedserve.serve_app.app import replica_options

    from ray.serve.config import RequestRouterConfig

    product = replica_options(ServeArgs.from_args({"engine_class": "fake_engine:FakeAsyncEngine", **args}))
    config = product["request_router_config"]  # the same settings, another class (a copy would keep the class)
    return {"request_router_config": RequestRouterConfig(
        request_router_class=router_class, request_router_kwargs=config.request_router_kwargs,
        request_routing_stats_period_s=config.request_routing_stats_period_s,
        request_routing_stats_timeout_s=config.request_routing_stats_timeout_s,
        initial_backoff_s=config.initial_backoff_s, max_backoff_s=config.max_backoff_s)}


def hit_rate_through(cluster, name: str, args: dict, router_class: str | None, workload: list[list[int]]) -> float:
    from ray import serve

    options = router_options(args, router_class) if router_class is not None else {}
    with fake_engine_app(cluster, name, args, **options) as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            for prompt in workload:
                response = client.post("/v1/completions", json={"model": args["model"], "prompt": prompt,
                                                                 "max_tokens": 1})
                response.raise_for_status()
        handle = serve.get_deployment_handle("EngineReplica", name)
        seen: dict[str, dict] = {}
        while len(seen) < args["num_replicas"]:
            stats = handle.serving_stats.remote().result(timeout_s=30)
            seen[stats["replica"]] = stats
    return prefix_workload.hit_rate(sum(s["prefix_cache_queries"] for s in seen.values()),
                                    sum(s["prefix_cache_hits"] for s in seen.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--affinity-tolerance", type=float, default=None,
                        help="router.affinity_tolerance (default: the product's)")
    options = parser.parse_args()
    model = str(build_tiny_model("llama", Path(tempfile.mkdtemp()), tokenizer="byte-bpe", num_hidden_layers=2))
    from transformers import AutoTokenizer

    workload = prefix_workload.prompts(AutoTokenizer.from_pretrained(model))
    args = {"model": model, "max_model_len": 256, "block_size": prefix_workload.BLOCK_SIZE,
            "num_blocks": prefix_workload.NUM_BLOCKS, "num_replicas": 2, "num_cpus_per_replica": 0.5,
            "router": {"stats_period_s": 0.2}}
    if options.affinity_tolerance is not None:
        args["router"]["affinity_tolerance"] = options.affinity_tolerance
    rows = []
    with local_cluster() as cluster:
        for index, (router, router_class) in enumerate(ROUTERS.items()):
            rows.append((router, hit_rate_through(cluster, f"affinity{index}", args, router_class, workload)))
    replayed = prefix_workload.random_routing_hit_rate(workload)
    print(f"{len(workload)} requests, {prefix_workload.NUM_PREFIXES} prefixes of {prefix_workload.PREFIX_BLOCKS} "
          f"blocks, 2 replicas of {prefix_workload.NUM_BLOCKS} blocks; random routing replayed through the cache "
          f"model: {replayed:.3f}")
    print("| router | prompt tokens from the prefix cache |")
    print("|---|---|")
    for router, rate in rows:
        print(f"| {router} | {rate:.3f} |")
    print(f"affinity / random through Ray: {rows[0][1] / rows[1][1]:.2f}x" if rows[1][1] else "random: 0 hits")


if __name__ == "__main__":
    main()
