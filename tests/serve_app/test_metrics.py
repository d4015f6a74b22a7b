"""Metrics, dashboard, alert rules and request logs (issue 6).

The unit half needs no Ray: the dashboard and the rules query only series the service exports, the request
timing and its log record. The service half runs the real engine on a tiny model behind Ray Serve with
Ray's metrics agent on a port of its own, scrapes it while long generations run, and, where a
`prometheus` binary is installed (Debian package `prometheus`), points a real Prometheus at it and
evaluates every dashboard query and alert rule there.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pagedserve.engine.core.request import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.engine.core.stats import EngineStats, StepStats
from pagedserve.serve_app.metric_names import REPLICA_METRICS, SCRAPED_NAMES, metric_names_in_promql
from pagedserve.serve_app.metrics import ITL_SAMPLES_PER_REQUEST, ReplicaMetrics, RequestTiming, sample_evenly

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "k8s" / "grafana" / "pagedserve-dashboard.json"
RULES = REPO_ROOT / "k8s" / "prometheus" / "pagedserve-rules.yaml"
PROMETHEUS_RULE = REPO_ROOT / "k8s" / "prometheus" / "prometheusrule.yaml"
PODMONITOR = REPO_ROOT / "k8s" / "prometheus" / "podmonitor.yaml"
# Series Ray itself exports that the rules use (replica health from Ray Serve).
RAY_BUILTIN_NAMES = {"ray_serve_deployment_replica_healthy"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


# ---- files ---------------------------------------------------------------------------------------------


def test_dashboard_queries_only_exported_metrics() -> None:
    names = metric_names_in_promql(dashboard_expressions())
    assert names, "the dashboard queries nothing"
    assert names <= SCRAPED_NAMES, f"not exported: {sorted(names - SCRAPED_NAMES)}"
    # The panels the issue asks for are there.
    for needed in ("ray_vllm_kv_cache_usage_perc", "ray_pagedserve_kv_cache_bytes_used", "ray_vllm_num_requests_running",
                   "ray_vllm_num_requests_waiting", "ray_pagedserve_decode_prefill_ratio",
                   "ray_vllm_time_to_first_token_seconds_bucket", "ray_vllm_e2e_request_latency_seconds_bucket",
                   "ray_vllm_generation_tokens_total", "ray_vllm_num_preemptions_total",
                   "ray_vllm_prefix_cache_hits_total", "ray_pagedserve_router_decisions_total"):
        assert needed in names, needed


def test_dashboard_thresholds_and_import_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert "id" not in dashboard  # importable into any Grafana: the server assigns the id
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    warn_at = {}
    for panel in dashboard["panels"]:
        steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
        if len(steps) > 1:
            warn_at[panel["title"]] = steps[1]["value"]
    assert warn_at == {"KV cache usage": 0.9, "Running requests": 500, "Waiting requests": 50,
                       "Decode / prefill token ratio": 1.0}


def test_alert_rules_use_exported_metrics_and_match_the_operator_form() -> None:
    names = metric_names_in_promql(rule_expressions())
    assert names <= SCRAPED_NAMES | RAY_BUILTIN_NAMES, sorted(names - SCRAPED_NAMES - RAY_BUILTIN_NAMES)
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert {"PagedserveKVCacheNearlyFull", "PagedserveManyWaitingRequests", "PagedserveTTFTOverSLO",
            "PagedserveReplicaUnhealthy", "PagedserveMetricsTargetDown"} <= alerts
    operator_rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert operator_rule["kind"] == "PrometheusRule"
    assert operator_rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_podmonitor_selects_the_pods_and_port_of_the_manifests() -> None:
    monitor = yaml.safe_load(PODMONITOR.read_text())
    selector = monitor["spec"]["selector"]["matchLabels"]
    port_name = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    for manifest in ("rayservice.yaml", "raycluster.yaml"):
        docs = [d for d in yaml.safe_load_all((REPO_ROOT / "k8s" / manifest).read_text()) if d]
        cluster = next(d for d in docs if d["kind"] in ("RayService", "RayCluster"))
        spec = cluster["spec"].get("rayClusterConfig", cluster["spec"])
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            pod = group["template"]
            assert selector.items() <= pod["metadata"]["labels"].items(), manifest
            ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
            assert ports.get(port_name) == 8080, (manifest, ports)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_each_alert_fires_on_its_condition() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(["promtool", "test", "rules", RULES.with_name("pagedserve-rules.test.yaml").name],
                            capture_output=True, text=True, cwd=RULES.parent, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- recording without Ray -----------------------------------------------------------------------------


def _stats(**fields) -> EngineStats:
    base = dict(num_free_blocks=10, num_total_blocks=16, block_size=16, num_running=1, num_waiting=0,
                num_preempted_waiting=0, max_model_len=512, kv_cache_usage=0.375, kv_cache_bytes_total=1600,
                kv_cache_bytes_used=600, max_batch_tokens=256)
    return EngineStats(**{**base, **fields})


def test_replica_metrics_record_without_a_ray_cluster() -> None:
    metrics = ReplicaMetrics(model_name="m", replica="r")
    metrics.observe(_stats(num_prompt_tokens_total=5, finished_by_reason={"stop": 1}))
    metrics.observe_step(StepStats(num_prefill_tokens=4, num_decode_tokens=2, num_seqs=3, step_time_s=0.01), _stats())
    assert metrics._decode_prefill_ratio(time.monotonic()) == pytest.approx(0.5)
    assert metrics._decode_prefill_ratio(time.monotonic() + 60) == 0.0  # old steps leave the window


class _Recorded:
    """Stands in for one Ray metric: keeps what was recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict]] = []

    def observe(self, value, tags=None) -> None:
        self.calls.append(("observe", value, tags))

    def set(self, value, tags=None) -> None:
        self.calls.append(("set", value, tags))

    def inc(self, value=1.0, tags=None) -> None:
        self.calls.append(("inc", value, tags))


def test_steps_are_queued_on_the_delivering_thread_and_recorded_with_the_next_snapshot() -> None:
    metrics = ReplicaMetrics(model_name="m", replica="r")
    metrics._metrics = collections.defaultdict(_Recorded)
    for prefill, decode in ((64, 2), (0, 3)):
        metrics.observe_step(StepStats(num_prefill_tokens=prefill, num_decode_tokens=decode, num_seqs=3,
                                       step_time_s=0.01), _stats())
    assert not any(metric.calls for metric in metrics._metrics.values())  # nothing reaches Ray on that thread
    metrics.observe(_stats())
    assert [c[1] for c in metrics._metrics["vllm_iteration_tokens_total"].calls] == [66, 3]
    kinds = [c[2]["step_kind"] for c in metrics._metrics["pagedserve_step_time_seconds"].calls]
    assert kinds == ["mixed", "decode"]
    assert metrics._metrics["pagedserve_batch_fill"].calls[-1][1] == pytest.approx(3 / 256)  # the last step's
    metrics._metrics["vllm_iteration_tokens_total"].calls.clear()
    metrics.observe(_stats())
    assert metrics._metrics["vllm_iteration_tokens_total"].calls == []  # each step recorded once


def test_lora_slot_loads_count_the_engines_total_by_its_increments() -> None:
    metrics = ReplicaMetrics(model_name="m", replica="r")
    metrics._metrics = collections.defaultdict(_Recorded)
    for total in (0, 3, 3, 5):
        metrics.observe(_stats(num_lora_slot_loads_total=total))
    assert [c[1] for c in metrics._metrics["pagedserve_lora_slot_loads"].calls] == [3, 2]


def test_a_request_records_at_most_a_sample_of_its_inter_token_latencies() -> None:
    assert sample_evenly([1.0, 2.0], 32) == [1.0, 2.0]
    values = [float(i) for i in range(255)]
    sample = sample_evenly(values, 32)
    assert len(sample) == 32 and sample[0] == 0.0 and sample == sorted(sample)
    assert abs(sum(sample) / 32 - sum(values) / 255) < 255 / 32  # evenly spread: the mean within one stride
    metrics = ReplicaMetrics(model_name="m", replica="r")
    metrics._metrics = collections.defaultdict(_Recorded)
    timing = RequestTiming("req-3")
    timing.inter_token_latencies_s = values
    metrics.observe_request(timing)
    assert len(metrics._metrics["vllm_inter_token_latency_seconds"].calls) == ITL_SAMPLES_PER_REQUEST


def test_request_timing_and_log_record_never_hold_the_prompt() -> None:
    timing = RequestTiming("req-1")
    first = RequestOutput("req-1", "secret prompt", [1, 2, 3], [CompletionOutput(0, "a", [7])], finished=False)
    timing.add_delta(first)
    time.sleep(0.01)
    metrics = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.5, first_token_time=101.0,
                             last_token_time=103.0, finished_time=103.0)
    last = RequestOutput("req-1", "secret prompt", [1, 2, 3], [CompletionOutput(0, "bc", [8, 9], finish_reason="length")],
                         finished=True, metrics=metrics, num_cached_tokens=2)
    timing.add_delta(last)
    assert (timing.num_prompt_tokens, timing.num_output_tokens, timing.finish_reason) == (3, 3, "length")
    assert (timing.queue_time_s, timing.ttft_s, timing.e2e_s, timing.tpot_s) == (0.5, 1.0, 3.0, 1.0)
    assert len(timing.inter_token_latencies_s) == 2 and all(v > 0 for v in timing.inter_token_latencies_s)
    record = timing.log_fields("replica-a")
    assert "secret" not in json.dumps(record) and "prompt" not in record
    assert {"request_id", "replica", "prompt_tokens", "output_tokens", "ttft_s", "total_time_s", "finish_reason"} <= set(record)
    assert timing.log_fields("replica-a", prompt="secret prompt")["prompt"] == "secret prompt"


def test_merged_first_delta_still_counts_one_latency_per_later_token() -> None:
    """A slow consumer can get its first tokens merged into one delta: tokens 2..k still count."""
    timing = RequestTiming("req-2")
    first_token_time = time.monotonic() - 0.2
    metrics = RequestMetrics(arrival_time=first_token_time - 0.1, first_token_time=first_token_time)
    merged = RequestOutput("req-2", "p", [1], [CompletionOutput(0, "abc", [7, 8, 9])], finished=False, metrics=metrics)
    timing.add_delta(merged)
    assert len(timing.inter_token_latencies_s) == 2
    assert sum(timing.inter_token_latencies_s) == pytest.approx(0.2, abs=0.05)
    timing.add_delta(RequestOutput("req-2", "p", [1], [CompletionOutput(0, "d", [10])], finished=False, metrics=metrics))
    assert len(timing.inter_token_latencies_s) == 3  # output tokens - 1


def test_log_settings_reach_both_deployments() -> None:
    from pagedserve.config.serve import ServeArgs
    from pagedserve.serve_app.app import logging_config, replica_options

    args = ServeArgs.from_args({"log_level": "DEBUG", "log_encoding": "JSON", "log_prompts": True})
    assert replica_options(args)["logging_config"] == {"log_level": "DEBUG", "encoding": "JSON"}
    assert logging_config(args) == {"log_level": "DEBUG", "encoding": "JSON"}
    assert ServeArgs.from_args({}).log_prompts is False
    with pytest.raises(Exception, match="log_level"):
        ServeArgs.from_args({"log_level": "LOUD"})


def test_engine_log_records_reach_the_replicas_serve_log() -> None:
    """Ray Serve gives its `ray.serve` logger the replica's handlers and level; the engine logs under
    `pagedserve`, whose INFO records the root logger would drop."""
    import logging

    from pagedserve.serve_app.replica import log_engine_through_serve

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    serve_logger, engine_logger = logging.getLogger("ray.serve"), logging.getLogger("pagedserve")
    saved = (serve_logger.level, list(serve_logger.handlers), engine_logger.level, list(engine_logger.handlers),
             engine_logger.propagate)
    collect = Collect()
    try:
        serve_logger.handlers[:] = [collect]
        serve_logger.setLevel(logging.INFO)
        log_engine_through_serve()
        log_engine_through_serve()  # a second replica in the process adds no second handler
        logging.getLogger("pagedserve.engine.core.llm_engine").info("memory plan: %d blocks", 7)
        logging.getLogger("pagedserve.engine.core.llm_engine").debug("not at INFO")
        assert collect.messages == ["memory plan: 7 blocks"]
        assert engine_logger.getEffectiveLevel() == logging.INFO and not engine_logger.propagate
    finally:
        serve_logger.setLevel(saved[0])
        serve_logger.handlers[:] = saved[1]
        engine_logger.setLevel(saved[2])
        engine_logger.handlers[:] = saved[3]
        engine_logger.propagate = saved[4]


# ---- the real service ----------------------------------------------------------------------------------

ray = pytest.importorskip("ray")
from pagedserve.serve_app import build_app  # noqa: E402
from ray_harness import deployed, metric_samples  # noqa: E402

API_KEY = "metrics-key"
NUM_LONG, LONG_TOKENS = 4, 300
SHARED_PREFIX = "The quick brown fox jumps over the lazy dog. " * 6  # several full blocks: prefix cache hits



def parse_scrape(text: str, application: str, model: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} of a Prometheus text exposition (labels without Ray's per-process ones), of
    this module's application only: the series of the processes that recorded something for `model` (its
    engine replica and ingress) and those Serve labels with `application`. The session's cluster is shared,
    and its metrics agent still exports the series of applications deleted before."""
    samples = metric_samples(text)
    workers = {labels.get("WorkerId") for _, labels, _ in samples if labels.get("model") == model}
    series: dict[tuple[str, frozenset], float] = {}
    for name, labels, value in samples:
        if labels.get("WorkerId") not in workers and labels.get("application") != application:
            continue
        keep = frozenset((k, v) for k, v in labels.items() if k in ("model", "replica", "finished_reason", "reason",
                                                                    "le", "step_kind", "deployment", "api_key_name",
                                                                    "kind"))
        key = (name, keep)
        series[key] = series.get(key, 0.0) + value
    return series


def total(series: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= set(ls))


def names(series: dict) -> set[str]:
    return {n for n, _ in series}


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model_path: str):
    args = {"model": tiny_model_path, "num_replicas": 1, "num_blocks": 96, "block_size": 16,
            "max_model_len": 512, "served_model_name": "tiny", "api_key": API_KEY,
            "router": {"stats_period_s": 0.25}}
    # The cluster's metrics agent reports every 0.5 s on a port of its own (ray_harness.local_cluster).
    with deployed(ray_cluster, "metrics", build_app(args)) as base:
        yield {"base": base, "metrics": ray_cluster.metrics_url, "metrics_port": ray_cluster.metrics_port}


def scrape(service) -> dict:
    return parse_scrape(httpx.get(service["metrics"], timeout=10).text, application="metrics", model="tiny")


def wait_for(service, predicate, timeout_s: float, what: str) -> dict:
    deadline = time.time() + timeout_s
    series: dict = {}
    while time.time() < deadline:
        series = scrape(service)
        if predicate(series):
            return series
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last scrape had {sorted(names(series))}")


class Prometheus:
    """A real Prometheus server scraping the Ray metrics agent every second, with our alert rules."""

    def __init__(self, workdir: Path, metrics_port: int, web_port: int) -> None:
        shutil.copy(RULES, workdir / "rules.yaml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{"job_name": "pagedserve",
                                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{web_port}"
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{web_port}"],
            stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"),
        )

    def query(self, expr: str) -> list:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def stream_long(base: str, prompt: str) -> None:
    with httpx.stream("POST", f"{base}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": LONG_TOKENS, "ignore_eos": True,
                            "stream": True}) as response:
        assert response.status_code == 200
        for _ in response.iter_lines():
            pass


@pytest.mark.ray
def test_metrics_move_with_load_and_a_real_prometheus_reads_them(service, tmp_path: Path, free_port) -> None:
    base = service["base"]
    prometheus = None
    if shutil.which("prometheus") is not None:
        prometheus = Prometheus(tmp_path, service["metrics_port"], free_port())
    try:
        before = wait_for(service, lambda s: any(n == "ray_vllm_kv_cache_usage_perc" and ("model", "tiny") in labels
                                                 for n, labels in s), 60, "replica gauges")
        assert total(before, "ray_vllm_kv_cache_usage_perc", model="tiny") == 0.0

        # Refusals: no key (401), a bad body (400).
        assert httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
        bad = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                         json={"model": "tiny", "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400

        threads = [threading.Thread(target=stream_long, args=(base, f"{SHARED_PREFIX}Request {i}."))
                   for i in range(NUM_LONG)]
        for thread in threads:
            thread.start()
        # Every gauge of the replica's report waited for: the metrics agent exports each on its own, so one scrape
        # may hold the new usage beside the old bytes (a fresh clone's run failed on exactly that, 0.0 > 0).
        during = wait_for(service, lambda s: total(s, "ray_vllm_kv_cache_usage_perc", model="tiny") > 0
                          and total(s, "ray_vllm_num_requests_running", model="tiny") > 0
                          and total(s, "ray_pagedserve_kv_cache_bytes_used", model="tiny") > 0
                          and total(s, "ray_pagedserve_kv_cache_free_blocks", model="tiny") < 96,
                          60, "KV usage above 0")
        assert total(during, "ray_pagedserve_kv_cache_bytes_used", model="tiny") > 0
        for thread in threads:
            thread.join(120)
        # The same prompt again: its full blocks come from the prefix cache.
        again = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                           json={"model": "tiny", "prompt": f"{SHARED_PREFIX}Request 0.", "max_tokens": 2})
        assert again.status_code == 200

        after = wait_for(service, lambda s: total(s, "ray_vllm_num_requests_running", model="tiny") == 0
                         and total(s, "ray_vllm_kv_cache_usage_perc", model="tiny") == 0
                         and total(s, "ray_vllm_request_success_total", finished_reason="length") >= NUM_LONG
                         and total(s, "ray_vllm_e2e_request_latency_seconds_count") >= NUM_LONG
                         and total(s, "ray_pagedserve_api_key_tokens_total", api_key_name="default",
                                   kind="completion") >= NUM_LONG * LONG_TOKENS
                         and total(s, "ray_pagedserve_api_key_requests_total", api_key_name="default") >= NUM_LONG + 1,
                         60, "KV usage back to 0 and counters caught up")
        # Per API key, under its name (`api_key` is the key named default): requests, tokens, the refused body.
        assert total(after, "ray_pagedserve_api_key_requests_total", api_key_name="default") >= NUM_LONG + 1
        assert total(after, "ray_pagedserve_api_key_tokens_total", api_key_name="default", kind="prompt") > 0
        assert total(after, "ray_pagedserve_api_key_rejected_requests_total", api_key_name="default", reason="400") == 1
        assert total(after, "ray_pagedserve_api_key_rejected_requests_total", reason="requests_per_s") == 0
        assert total(after, "ray_pagedserve_kv_cache_bytes_used", model="tiny") == 0
        assert total(after, "ray_pagedserve_kv_cache_free_blocks", model="tiny") == 96
        assert total(after, "ray_vllm_generation_tokens_total", model="tiny") >= NUM_LONG * LONG_TOKENS
        assert total(after, "ray_vllm_prompt_tokens_total", model="tiny") > total(before, "ray_vllm_prompt_tokens_total",
                                                                                  model="tiny")
        assert total(after, "ray_vllm_prefix_cache_queries_total", model="tiny") > 0
        assert total(after, "ray_vllm_prefix_cache_hits_total", model="tiny") > 0
        for histogram in ("ray_vllm_time_to_first_token_seconds", "ray_vllm_e2e_request_latency_seconds",
                          "ray_vllm_request_time_per_output_token_seconds", "ray_vllm_request_generation_tokens"):
            assert total(after, histogram + "_count", model="tiny") >= NUM_LONG, histogram
        # Each request records up to ITL_SAMPLES_PER_REQUEST of its LONG_TOKENS - 1 inter-token latencies.
        assert total(after, "ray_vllm_inter_token_latency_seconds_count") >= NUM_LONG * ITL_SAMPLES_PER_REQUEST
        assert total(after, "ray_vllm_iteration_tokens_total_count") >= LONG_TOKENS
        assert total(after, "ray_pagedserve_step_time_seconds_count", step_kind="decode") > 0
        assert total(after, "ray_vllm_request_generation_tokens_sum") > 0
        assert total(after, "ray_pagedserve_rejected_requests_total", model="tiny", reason="401") >= 1
        assert total(after, "ray_pagedserve_rejected_requests_total", model="tiny", reason="400") >= 1
        assert total(after, "ray_pagedserve_rejected_requests_total", model="tiny", reason="429") == 0
        assert total(after, "ray_pagedserve_router_decisions_total") >= NUM_LONG
        assert "ray_pagedserve_router_queue_length" in names(after)
        # Counters start at 0, as vLLM's do, so rate() panels show 0 rather than no data.
        assert any(n == "ray_vllm_num_preemptions_total" and ("model", "tiny") in labels for n, labels in after)
        assert total(after, "ray_vllm_request_success_total", model="tiny", finished_reason="error") == 0
        assert "ray_pagedserve_router_refused_total" in names(after)
        assert "ray_serve_deployment_replica_healthy" in names(after)  # used by the replica-down alert
        # Everything the replica records reached the scrape (the router's refusal counter needs a refusal).
        expected = {s for n, (kind, _, _) in REPLICA_METRICS.items() for s in
                    ([f"ray_{n}_total"] if kind == "counter" else [f"ray_{n}_count"] if kind == "histogram" else [f"ray_{n}"])}
        assert expected <= names(after), sorted(expected - names(after))

        if prometheus is not None:
            check_with_prometheus(prometheus)
    finally:
        if prometheus is not None:
            prometheus.stop()
    check_request_log_lines()


def check_with_prometheus(prometheus: Prometheus) -> None:
    # Prometheus scrapes every second: wait until it has seen the whole run.
    generated = 0.0
    deadline = time.time() + 30
    while time.time() < deadline and generated < NUM_LONG * LONG_TOKENS:
        try:
            result = prometheus.query('sum(ray_vllm_generation_tokens_total{model="tiny"})')
            generated = float(result[0]["value"][1]) if result else 0.0
        except (httpx.HTTPError, AssertionError):
            pass
        time.sleep(0.5)
    assert generated >= NUM_LONG * LONG_TOKENS
    # Every dashboard query parses and runs (template variables set to "all"); the core ones have data.
    for expr in dashboard_expressions():
        concrete = expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$replica", ".*")
        if concrete.startswith("label_values("):
            inner = re.match(r"label_values\((.*), (\w+)\)$", concrete)
            assert inner is not None, concrete
            assert prometheus.query(f"count by ({inner.group(2)}) ({inner.group(1)})"), concrete
            continue
        prometheus.query(concrete)
    for expr in ('ray_vllm_kv_cache_usage_perc{model=~".*"}', "rate(ray_vllm_generation_tokens_total[1m])",
                 "histogram_quantile(0.99, sum by (le) (rate(ray_vllm_time_to_first_token_seconds_bucket[1m])))"):
        assert prometheus.query(expr), expr
    rules = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    assert len(loaded) == len(rule_expressions())
    assert all(r["health"] in ("ok", "unknown") for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]


def check_request_log_lines() -> None:
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    records = []
    for path in logs_dir.glob("replica_metrics_EngineReplica_*.log"):  # this module's application only
        for line in path.read_text(errors="replace").splitlines():
            if "request_finished {" in line:
                records.append(json.loads(line[line.index("request_finished {") + len("request_finished "):]))
    finished = [r for r in records if r["finish_reason"] == "length" and r["output_tokens"] == LONG_TOKENS]
    assert len(finished) >= NUM_LONG, records
    assert all("prompt" not in r for r in records)
    assert all(r["ttft_s"] is not None and r["total_time_s"] >= r["ttft_s"] for r in finished)
