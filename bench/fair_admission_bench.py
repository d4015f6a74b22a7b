"""Issue 28's tenant bar through Ray: one API key flooding at 10x its request limit, another key's streamed
TTFT unloaded and under the flood, for each fair-queue bound (router.max_routing_per_key).

Runs the service with the fake engine of the tests (tests/serve_app/fake_engine.py: no model, 5 ms steps,
real KV-block accounting) on a local Ray cluster of the tests' harness, so it needs the test extras and a
checkout. The flood's admitted requests are long, so they hold most KV blocks: what the calm key waits for
is room, which fair admission alone does not make and the router's per-key shares keep (router.py,
key_shares.py). Prints one row per bound.

    .venv/bin/python bench/fair_admission_bench.py [--bounds 1 4 64] [--flood-limit 4] [--flood-max-tokens 120]
                                                   [--flood-threads 4] [--fair-share-window-s 0]
                                                   [--ingress-replicas 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS_DIR), str(TESTS_DIR / "serve_app")]
from ray_harness import fake_engine_app, local_cluster  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

FLOOD_KEY, CALM_KEY = "flood-key", "calm-key"


def first_token_s(base: str, model: str, key: str) -> float:
    """Seconds from sending a streamed completion to its first text delta (the stream is read to its end)."""
    start = time.monotonic()
    first = None
    with httpx.stream("POST", f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": model, "prompt": "Hello", "max_tokens": 4, "stream": True}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"calm request answered {response.status_code}: {response.read()!r}")
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and '"text"' in line:
                first = time.monotonic() - start
    if first is None:
        raise RuntimeError("a calm stream ended without text")
    return first


def flood(base: str, model: str, rate_per_s: float, max_tokens: int, stop: threading.Event, codes: list) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            sent = time.monotonic()
            response = client.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {FLOOD_KEY}"},
                                   json={"model": model, "prompt": "Hello", "max_tokens": max_tokens})
            codes.append((response.status_code, response.headers.get("retry-after")))
            time.sleep(max(0.0, 1 / rate_per_s - (time.monotonic() - sent)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bounds", type=int, nargs="+", default=[1, 4, 64], help="router.max_routing_per_key values")
    parser.add_argument("--flood-limit", type=float, default=4.0, help="the flooding key's requests_per_s")
    parser.add_argument("--flood-max-tokens", type=int, default=120)
    parser.add_argument("--flood-threads", type=int, default=4,
                        help="the flood's clients, each one request at a time (8 x 120 tokens: more than the blocks)")
    parser.add_argument("--num-blocks", type=int, default=40, help="KV blocks of the one replica (16 tokens each)")
    parser.add_argument("--calm-requests", type=int, default=25)
    parser.add_argument("--fair-share-window-s", type=float, default=None,
                        help="router.fair_share_window_s (default: the product's; 0: no per-key shares)")
    parser.add_argument("--ingress-replicas", type=int, default=None,
                        help="ingress_num_replicas (default: the product's, 1 on CPUs): each runs its own router, "
                        "and the HTTP proxy spreads both keys' requests over them")
    options = parser.parse_args()
    model = str(build_tiny_model("llama", Path(tempfile.mkdtemp()), tokenizer="byte-bpe", num_hidden_layers=2))
    rows = []
    with local_cluster() as cluster:
        for bound in options.bounds:
            args = {"model": model, "max_model_len": 512, "block_size": 16, "num_blocks": options.num_blocks,
                    "num_replicas": 1, "num_cpus_per_replica": 1,
                    "api_keys": [{"name": "flood", "key": FLOOD_KEY, "requests_per_s": options.flood_limit},
                                 {"name": "calm", "key": CALM_KEY}],
                    "router": {"max_queued_requests": 1000, "queue_timeout_s": 60, "stats_period_s": 0.25,
                               "max_routing_per_key": bound}}
            if options.fair_share_window_s is not None:
                args["router"]["fair_share_window_s"] = options.fair_share_window_s
            if options.ingress_replicas is not None:
                args["ingress_num_replicas"] = options.ingress_replicas
            with fake_engine_app(cluster, f"fair{bound}", args) as base:
                def calm_series() -> list[float]:
                    values = []
                    for _ in range(options.calm_requests):
                        values.append(first_token_s(base, model, CALM_KEY))
                        time.sleep(0.3)
                    return values

                calm_series()  # warm-up
                unloaded = calm_series()
                stop, codes = threading.Event(), []
                rate = 10 * options.flood_limit / options.flood_threads
                threads = [threading.Thread(target=flood, args=(base, model, rate, options.flood_max_tokens, stop, codes))
                           for _ in range(options.flood_threads)]
                for thread in threads:
                    thread.start()
                time.sleep(3)
                loaded = calm_series()
                stop.set()
                for thread in threads:
                    thread.join()
            rows.append((bound, percentile(unloaded, 0.5), percentile(unloaded, 0.99), percentile(loaded, 0.5),
                         percentile(loaded, 0.99), sum(code == 200 for code, _ in codes),
                         sum(code == 429 for code, _ in codes),
                         ",".join(sorted({str(after) for code, after in codes if code == 429}))))
    print("| max_routing_per_key | calm TTFT p50 / p99 unloaded (s) | under the flood (s) | p99 ratio | flood 200 | "
          "flood 429 | Retry-After |")
    print("|---|---|---|---|---|---|---|")
    for bound, u50, u99, l50, l99, ok, refused, after in rows:
        print(f"| {bound} | {u50:.3f} / {u99:.3f} | {l50:.3f} / {l99:.3f} | {l99 / u99:.1f}x | {ok} | {refused} | "
              f"{after} |")


if __name__ == "__main__":
    main()
