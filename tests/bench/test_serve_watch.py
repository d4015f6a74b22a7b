"""bench/serve_watch.py's reading of a Ray metrics-agent scrape: exposition lines -> per-replica values.

Pure Python, no Ray: the scrape below has the shape of a real one (Ray 2.60's agent, two engine replicas of
the demo model, labels as serve_app/metrics.py records them plus the agent's own), shortened.
"""

from __future__ import annotations


import pytest
from bench_scripts import bench_script



@pytest.fixture(scope="module")
def serve_watch():
    yield from bench_script("serve_watch")


def series(name: str, replica: str, value: float, worker: str = "cdc8e68f", **extra: str) -> str:
    labels = {"Component": "core_worker", "NodeAddress": "192.0.2.2", "SessionName": "session_2026-11-29_09-50-45",
              "Version": "2.60.0", "WorkerId": worker, **extra, "model": "pagedserve-demo",
              "model_name": "pagedserve-demo",
              "otel_scope_name": "ray._private.telemetry.open_telemetry_metric_recorder",
              "otel_scope_schema_url": "", "replica": replica}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} " + repr(float(value))


SCRAPE = "\n".join([
    "# HELP ray_vllm_kv_cache_usage_perc Fraction of KV-cache blocks in use, 0..1.",
    "# TYPE ray_vllm_kv_cache_usage_perc gauge",
    series("ray_vllm_kv_cache_usage_perc", "cpyw7pe4", 0.4375),
    series("ray_vllm_kv_cache_usage_perc", "phxptlxi", 0.0, worker="06690c82"),
    "# HELP ray_vllm_num_requests_running Requests in the running batch.",
    "# TYPE ray_vllm_num_requests_running gauge",
    series("ray_vllm_num_requests_running", "cpyw7pe4", 32),
    series("ray_vllm_num_requests_running", "phxptlxi", 0, worker="06690c82"),
    # Watched names as prefixes of others: must not be read as the watched series.
    series("ray_vllm_num_requests_running_max", "cpyw7pe4", 99),
    series("ray_vllm_num_requests_waiting", "cpyw7pe4", 7),
    "# HELP ray_vllm_request_success_total Requests finished, by finished_reason (stop, length, abort, error).",
    "# TYPE ray_vllm_request_success_total counter",
    series("ray_vllm_request_success_total", "cpyw7pe4", 4, finished_reason="length"),
    series("ray_vllm_request_success_total", "cpyw7pe4", 1, finished_reason="stop"),
    series("ray_vllm_request_success_total", "cpyw7pe4", 2, finished_reason="abort"),
    series("ray_vllm_request_success_total", "phxptlxi", 0, worker="06690c82", finished_reason="length"),
    # The same replica seen from a second worker (other labels differ): the counter adds up.
    series("ray_vllm_request_success_total", "cpyw7pe4", 3, worker="ffff0000", finished_reason="length"),
    "# TYPE ray_vllm_e2e_request_latency_seconds histogram",
    series("ray_vllm_e2e_request_latency_seconds_bucket", "cpyw7pe4", 4, le="0.5"),
    # A replica label whose value needs the exposition format's escaping (quote, comma, brace).
    'ray_vllm_kv_cache_usage_perc{model="a,b",replica="odd\\"re,pl{ica}"} 0.25',
    # Series of other components: no replica label, or not watched at all.
    'ray_serve_num_http_requests_total{route="/",method="POST"} 512.0',
    'ray_vllm_num_requests_running{model="pagedserve-demo"} 5.0',
    "",
])


def test_scrape_becomes_per_replica_values(serve_watch) -> None:
    replicas = serve_watch.parse_replica_metrics(SCRAPE)
    assert set(replicas) == {"cpyw7pe4", "phxptlxi", 'odd"re,pl{ica}'}
    busy = replicas["cpyw7pe4"]
    assert busy.kv_cache_usage == pytest.approx(0.4375)
    assert busy.num_running == 32
    assert busy.finished_by_reason == {"length": 7.0, "stop": 1.0, "abort": 2.0}
    assert busy.num_completed == 8.0  # stop + length; abort and error are not served requests
    idle = replicas["phxptlxi"]
    assert (idle.kv_cache_usage, idle.num_running, idle.num_completed) == (0.0, 0.0, 0.0)
    odd = replicas['odd"re,pl{ica}']
    assert odd.kv_cache_usage == pytest.approx(0.25) and odd.num_running is None and odd.finished_by_reason == {}


def test_empty_or_unrelated_scrape_has_no_replicas(serve_watch) -> None:
    assert serve_watch.parse_replica_metrics("") == {}
    assert serve_watch.parse_replica_metrics('# TYPE up gauge\nup{job="ray"} 1.0\n') == {}


def test_finished_counts_are_taken_over_the_run(serve_watch) -> None:
    """Counters are cumulative over the service's life: a run counts from its first sample (a new replica: 0)."""
    samples = [
        {"t_s": 0.0, "metrics": {"a": {"kv": 0.0, "running": 0, "finished": {"length": 10.0}}}},
        {"t_s": 5.0, "metrics": {"a": {"kv": 0.5, "running": 3, "finished": {"length": 14.0, "abort": 1.0}},
                                 "c": {"kv": 0.1, "running": 1, "finished": {"length": 0.0}}}},
        {"t_s": 9.0, "metrics": {"a": {"kv": 0.0, "running": 0, "finished": {"length": 16.0, "abort": 1.0}},
                                 "c": {"kv": 0.0, "running": 0, "finished": {"length": 2.0}}}},
    ]
    assert serve_watch.finished_during(samples) == {"a": {"length": 6.0, "abort": 1.0}, "c": {"length": 2.0}}


def test_bench_table_headline(serve_watch) -> None:
    table = ("| requests ok / sent | 31 / 64 |\n| errors | {'service_unavailable': 33} |\n| wall time | 5.16 s |\n"
             "| request throughput | 6.01 req/s |\n| output tokens/s | 960.9 |\n")
    assert serve_watch.parse_bench_table(table) == {
        "output_tokens_per_s": 960.9, "request_throughput_per_s": 6.01, "wall_s": 5.16, "requests_ok": 31,
        "requests_sent": 64, "errors": "{'service_unavailable': 33}", "requests_failed": 33,
    }


def test_recovery_timeline_from_samples(serve_watch) -> None:
    """Kill of replica b at 4 s: Serve drops it, lists c (STARTING, then RUNNING), c counts a finished request."""
    kill = serve_watch.KillRecord(replica="b", pid=123, num_running_at_kill=30, replicas_before=["a", "b"],
                                  replicas_running_before=2, core_pids=[], kill_s=4.0)
    running, starting = {"state": "RUNNING", "pid": 1}, {"state": "STARTING", "pid": None}
    timeline = [
        (4.5, {"a": running, "b": running}, {"b": {"finished": {"length": 5.0}}}),
        (9.0, {"a": running, "c": starting}, {}),
        (30.0, {"a": running, "c": running}, {"c": {"finished": {"length": 0.0, "abort": 1.0}}}),
        (31.5, {"a": running, "c": running}, {"c": {"finished": {"length": 1.0, "abort": 1.0}}}),
    ]
    for t_s, replicas, metrics in timeline:
        serve_watch.update_recovery(kill, {"t_s": t_s, "replicas": replicas, "metrics": metrics})
    assert kill.replacement == "c" and kill.is_recovered
    assert kill.since_kill() == {"serve_saw_it_gone_s": 5.0, "replacement_listed_s": 5.0,
                                 "replacement_running_s": 26.0, "replacement_first_finished_s": 27.5,
                                 "core_processes_gone_s": None}
