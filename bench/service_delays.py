"""Where a streamed token waits inside the service, read from its Prometheus metrics around a load.

The ingress records each stream channel message's transit from the engine replica
(`pagedserve_stream_channel_delay_seconds`), and both replicas how late their event loops run
(`pagedserve_ingress_event_loop_lag_seconds`, `pagedserve_replica_event_loop_lag_seconds`; serve_app/loop_lag.py).
A client's inter-token gap is an engine step plus these (and the HTTP hop): `snapshot` reads the histograms'
buckets from Ray's metrics agents (each node's Prometheus endpoint, summed over every series), and `quantiles`
turns the difference of two snapshots into percentiles for what happened in between. A bucketed percentile is
the upper bound of the bucket it falls in (serve_app/metric_names.py DELAY_BUCKETS_S: steps of 0.5-10 ms below
20 ms). Ray's agents export every `metrics_report_interval_ms` (set `RAY_metrics_report_interval_ms=1000` on the
cluster), so take the second snapshot a couple of seconds after the load.

Nothing here imports Ray: only HTTP.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import httpx

DELAY_METRICS = {  # name in a report -> the scraped histogram
    "channel transit": "ray_pagedserve_stream_channel_delay_seconds",
    "ingress loop lag": "ray_pagedserve_ingress_event_loop_lag_seconds",
    "engine replica loop lag": "ray_pagedserve_replica_event_loop_lag_seconds",
}
_BUCKET_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
_LE = re.compile(r'(?:^|,)\s*le="(?P<le>[^"]+)"')

Buckets = dict[float, float]  # upper bound (le, inf included) -> cumulative count


def parse_buckets(text: str, names: Iterable[str] = DELAY_METRICS.values()) -> dict[str, Buckets]:
    """Each named histogram's cumulative bucket counts in a Prometheus text exposition, summed over its series."""
    wanted = set(names)
    found: dict[str, Buckets] = {name: {} for name in wanted}
    for line in text.splitlines():
        match = _BUCKET_LINE.match(line)
        if match is None or match["name"] not in wanted:
            continue
        le = _LE.search(match["labels"])
        if le is None:
            continue
        bound = math.inf if le["le"] in ("+Inf", "Inf", "inf") else float(le["le"])
        buckets = found[match["name"]]
        buckets[bound] = buckets.get(bound, 0.0) + float(match["value"])
    return found


def snapshot(urls: Iterable[str], timeout_s: float = 5.0) -> dict[str, Buckets]:
    """The histograms summed over every endpoint (one per node); an endpoint that does not answer counts nothing."""
    total: dict[str, Buckets] = {name: {} for name in DELAY_METRICS.values()}
    for url in urls:
        try:
            text = httpx.get(url, timeout=timeout_s).text
        except httpx.HTTPError:
            continue
        for name, buckets in parse_buckets(text).items():
            for bound, count in buckets.items():
                total[name][bound] = total[name].get(bound, 0.0) + count
    return total


def bucket_quantile(before: Buckets, after: Buckets, q: float) -> tuple[float | None, int]:
    """(upper bound of the bucket holding quantile q of the observations made between two snapshots, how many
    there were); (None, 0) without any."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]  # cumulative
    num = int(round(counts[-1])) if counts else 0
    if num <= 0:
        return None, 0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= q * num:
            return bound, num
    return bounds[-1], num


def quantiles(before: dict[str, Buckets], after: dict[str, Buckets]) -> dict[str, dict[str, float | int | None]]:
    """Per delay (DELAY_METRICS' names): p50, p99 (seconds, bucket upper bounds) and the count between snapshots."""
    report: dict[str, dict[str, float | int | None]] = {}
    for label, name in DELAY_METRICS.items():
        p50, num = bucket_quantile(before.get(name, {}), after.get(name, {}), 0.50)
        p99, _ = bucket_quantile(before.get(name, {}), after.get(name, {}), 0.99)
        report[label] = {"p50_s": p50, "p99_s": p99, "count": num}
    return report


def describe(report: dict[str, dict[str, float | int | None]]) -> str:
    """One line: each delay's p50 / p99 in ms (`<=`: a bucket's upper bound) and its sample count."""
    def ms(value: float | int | None) -> str:
        if value is None:
            return "n/a"
        return "> 1 s" if math.isinf(value) else f"<= {value * 1000:g}"

    return "; ".join(f"{label} p50 {ms(r['p50_s'])} / p99 {ms(r['p99_s'])} ms ({r['count']})"
                     for label, r in report.items())


def discover_urls(session_dir: Path) -> list[str]:
    """The metrics endpoints of a Ray cluster, from its session folder's Prometheus service discovery file
    (`prom_metrics_service_discovery.json`, what Ray writes for Prometheus to find its agents)."""
    path = session_dir / "prom_metrics_service_discovery.json"
    groups = json.loads(path.read_text())
    return [f"http://{target}/metrics" for group in groups for target in group.get("targets", [])]
