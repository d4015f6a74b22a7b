"""bench/service_delays.py: bucketed percentiles of the service's delay histograms between two scrapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench_scripts import bench_script

CHANNEL = "ray_pagedserve_stream_channel_delay_seconds"
INGRESS_LAG = "ray_pagedserve_ingress_event_loop_lag_seconds"


@pytest.fixture
def service_delays():
    yield from bench_script("service_delays")


def _exposition(counts_by_le: dict[str, float], replica: str) -> str:
    lines = ["# HELP ray_pagedserve_stream_channel_delay_seconds transit",
             "# TYPE ray_pagedserve_stream_channel_delay_seconds histogram"]
    for le, count in counts_by_le.items():
        lines.append(f'{CHANNEL}_bucket{{Component="core_worker",le="{le}",model="m",replica="{replica}"}} {count}')
    lines.append(f'{CHANNEL}_count{{model="m",replica="{replica}"}} {max(counts_by_le.values())}')
    lines.append(f'{INGRESS_LAG}_bucket{{le="0.001",model="m",replica="{replica}"}} 7.0')  # another histogram
    lines.append(f'{INGRESS_LAG}_bucket{{le="+Inf",model="m",replica="{replica}"}} 9.0')
    lines.append('ray_other_bucket{le="0.001"} 100.0')  # not one of ours
    return "\n".join(lines) + "\n"


def test_buckets_are_summed_over_series_and_percentiles_come_from_the_difference(service_delays) -> None:
    first = service_delays.parse_buckets(
        _exposition({"0.001": 10, "0.005": 10, "0.01": 10, "+Inf": 10}, "a")
        + _exposition({"0.001": 0, "0.005": 0, "0.01": 0, "+Inf": 0}, "b"))
    assert first[CHANNEL] == {0.001: 10.0, 0.005: 10.0, 0.01: 10.0, math.inf: 10.0}
    assert first[INGRESS_LAG] == {0.001: 14.0, math.inf: 18.0}
    # Between the scrapes: 100 more, 90 of them at most 1 ms, 9 in (1, 5] ms and one in (5, 10] ms.
    second = service_delays.parse_buckets(
        _exposition({"0.001": 60, "0.005": 65, "0.01": 65, "+Inf": 65}, "a")
        + _exposition({"0.001": 40, "0.005": 44, "0.01": 45, "+Inf": 45}, "b"))
    report = service_delays.quantiles(first, second)
    transit = report["channel transit"]
    assert transit == {"p50_s": 0.001, "p99_s": 0.005, "count": 100}
    assert report["ingress loop lag"]["count"] == 0 and report["ingress loop lag"]["p99_s"] is None  # nothing new
    line = service_delays.describe(report)
    assert "channel transit p50 <= 1 / p99 <= 5 ms (100)" in line and "ingress loop lag p50 n/a" in line


def test_an_observation_past_the_last_bound_reads_as_over_a_second(service_delays) -> None:
    before = {CHANNEL: {0.5: 0.0, 1.0: 0.0, math.inf: 0.0}}
    after = {CHANNEL: {0.5: 0.0, 1.0: 0.0, math.inf: 3.0}}
    bound, count = service_delays.bucket_quantile(before[CHANNEL], after[CHANNEL], 0.99)
    assert bound == math.inf and count == 3
    assert "> 1 s" in service_delays.describe(service_delays.quantiles(before, after))


def test_endpoints_come_from_rays_service_discovery_file(service_delays, tmp_path) -> None:
    (tmp_path / "prom_metrics_service_discovery.json").write_text(json.dumps(
        [{"labels": {"job": "ray"}, "targets": ["10.0.0.1:44217", "10.0.0.2:44217"]}]))
    assert service_delays.discover_urls(tmp_path) == ["http://10.0.0.1:44217/metrics", "http://10.0.0.2:44217/metrics"]


def test_an_endpoint_that_does_not_answer_counts_nothing(service_delays) -> None:
    empty = service_delays.snapshot(["http://127.0.0.1:9/metrics"], timeout_s=0.5)
    assert all(buckets == {} for buckets in empty.values())
    with pytest.raises(FileNotFoundError):
        service_delays.discover_urls(Path("/nonexistent"))
