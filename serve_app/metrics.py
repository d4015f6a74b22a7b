"""Recording the service's metrics through Ray's metrics agent (`ray.util.metrics`): one class per audience,
`ReplicaMetrics` (an engine replica), `IngressMetrics`, `RouterMetrics`. Names, types, buckets and labels
are in serve_app/metric_names.py.

Every process of the cluster (engine replicas, ingress, its router) records into Ray's per-node metrics
agent, so one scrape of each node's agent (`--metrics-export-port`, 8080 on KubeRay) sees every replica.
Recording never fails a request: outside a Ray cluster the values stay in the process (exported if it
joins one later), and where Ray's metrics cannot be created they are no-ops.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from pagedserve.engine.core.request import RequestOutput
from pagedserve.engine.core.stats import EngineStats, StepStats
from pagedserve.serve_app.metric_names import (
    API_KEY_LIMITS,
    DELAY_BUCKETS_S,
    DELAY_HISTOGRAMS,
    FINISH_REASONS,
    INGRESS_METRICS,
    INGRESS_TAGS,
    LATENCY_BUCKETS_S,
    REJECTION_STATUSES,
    REPLICA_METRICS,
    REPLICA_TAGS,
    ROUTER_METRICS,
    ROUTER_REFUSALS,
    ROUTER_TAGS,
    SPEC_DECODE_DECISIONS,
    STEP_TIME_BUCKETS_S,
    TOKEN_COUNT_BUCKETS,
)

def _start_counters_at_zero(counter: Any, tag_sets: Iterable[dict[str, str]]) -> None:
    """Export a counter at 0 before its first increment, as prometheus-client does for vLLM.

    Without it a never-incremented series is absent and `rate()` panels show no data instead of 0.
    `Counter.inc` refuses 0, so this records through the metric's `_record`; where a Ray version lacks
    it, the counter simply appears on its first increment.
    """
    record = getattr(counter, "_record", None)
    if record is None:
        return
    for tags in tag_sets:
        try:
            record(0.0, tags=tags)
        except Exception:  # noqa: BLE001 - best effort
            return


class _NoOp:
    def set(self, *args: Any, **kwargs: Any) -> None:
        pass

    inc = observe = set


def _buckets_for(name: str) -> list[float]:
    if name.endswith("tokens") or name == "vllm_iteration_tokens_total":
        return [float(b) for b in TOKEN_COUNT_BUCKETS]
    if name == "pagedserve_step_time_seconds":
        return STEP_TIME_BUCKETS_S
    if name in DELAY_HISTOGRAMS:
        return DELAY_BUCKETS_S
    return LATENCY_BUCKETS_S


def _make_metrics(table: dict[str, tuple[str, str, tuple[str, ...]]], base_tags: tuple[str, ...]) -> dict[str, Any]:
    """Ray metric objects for a table; no-ops where Ray's metrics are not available."""
    try:
        from ray.util.metrics import Counter, Gauge, Histogram
    except Exception:  # noqa: BLE001 - metrics are best effort
        return {name: _NoOp() for name in table}
    made: dict[str, Any] = {}
    for name, (kind, description, extra_tags) in table.items():
        tag_keys = base_tags + extra_tags
        try:
            if kind == "gauge":
                made[name] = Gauge(name, description=description, tag_keys=tag_keys)
            elif kind == "counter":
                made[name] = Counter(name, description=description, tag_keys=tag_keys)
            else:
                made[name] = Histogram(name, description=description, boundaries=_buckets_for(name),
                                       tag_keys=tag_keys)
        except Exception:  # noqa: BLE001 - outside a Ray worker: record nothing
            made[name] = _NoOp()
    return made


ITL_SAMPLES_PER_REQUEST = 32  # inter-token latencies a request records at most (see ReplicaMetrics)
MAX_PENDING_STEPS = 10_000  # steps queued for the next stats report at most (minutes of steps at 1 s reports)


def sample_evenly(values: list[float], limit: int) -> list[float]:
    """`values` if there are at most `limit`; else `limit` of them, evenly spaced, the first included."""
    if len(values) <= limit:
        return values
    stride = len(values) / limit
    return [values[int(i * stride)] for i in range(limit)]


class ReplicaMetrics:
    """The metrics of one engine replica (labels model, model_name, replica).

    Fed from three places: `observe(stats)` with the engine snapshot (the replica's routing-stats
    callback, every `stats_period_s`; Ray's agent exports every few seconds anyway, so gauges need no
    per-step update), `observe_step` on the engine core's delivering thread, and `observe_request` when a
    request's stream ends. Engine totals become Counter increments by diffing against the last snapshot
    seen, under a lock because two threads feed it.

    A Ray metric call costs microseconds of the caller's thread, and a gauge's can also give the GIL away: so
    `observe_step` only queues the step (that thread hands every step's outputs to the replica's event loop,
    and waited on Ray there) and `observe(stats)` records the queued steps; and a request records at most
    `ITL_SAMPLES_PER_REQUEST` inter-token latencies, evenly spaced over its tokens (every token's, as vLLM
    records them, held a busy replica's event loop for a noticeable part of a burst).
    """

    def __init__(self, model_name: str, replica: str, ratio_window_s: float = 10.0) -> None:
        self._tags = {"model": model_name, "model_name": model_name, "replica": replica}
        self._metrics = _make_metrics(REPLICA_METRICS, REPLICA_TAGS)
        self._lock = threading.Lock()
        self._last_totals: dict[str, int] = {}
        self._ratio_window_s = ratio_window_s
        self._recent_steps: deque[tuple[float, int, int]] = deque()  # (monotonic time, prefill, decode)
        # (step, max_batch_tokens) not yet recorded; bounded in case no stats report comes to record them
        self._pending_steps: deque[tuple[StepStats, int]] = deque(maxlen=MAX_PENDING_STEPS)
        for name, (kind, _, _) in REPLICA_METRICS.items():
            if kind == "counter" and name not in ("vllm_request_success", "vllm_spec_decode_num_accepted_tokens_per_pos",
                                                  "pagedserve_spec_decode_steps", "pagedserve_lora_requests",
                                                  "pagedserve_lora_generation_tokens"):
                _start_counters_at_zero(self._metrics[name], [self._tags])
        for name in ("pagedserve_lora_requests", "pagedserve_lora_generation_tokens"):
            _start_counters_at_zero(self._metrics[name], [{**self._tags, "lora_name": ""}])
        _start_counters_at_zero(self._metrics["vllm_request_success"],
                                [{**self._tags, "finished_reason": r} for r in FINISH_REASONS])
        # The first position's series exists from the start (the others appear with speculation's k).
        _start_counters_at_zero(self._metrics["vllm_spec_decode_num_accepted_tokens_per_pos"],
                                [{**self._tags, "position": "0"}])
        _start_counters_at_zero(self._metrics["pagedserve_spec_decode_steps"],
                                [{**self._tags, "decision": d} for d in SPEC_DECODE_DECISIONS])

    # -- engine snapshot -------------------------------------------------------------------------
    def observe(self, stats: EngineStats) -> None:
        m, tags = self._metrics, self._tags
        self.record_steps()
        m["vllm_num_requests_running"].set(stats.num_running, tags=tags)
        m["vllm_num_requests_waiting"].set(stats.num_waiting, tags=tags)
        m["vllm_kv_cache_usage_perc"].set(stats.kv_cache_usage, tags=tags)
        m["vllm_gpu_cache_usage_perc"].set(stats.kv_cache_usage, tags=tags)
        m["pagedserve_num_requests_preempted_waiting"].set(stats.num_preempted_waiting, tags=tags)
        m["pagedserve_kv_cache_bytes_used"].set(stats.kv_cache_bytes_used, tags=tags)
        m["pagedserve_kv_cache_bytes_free"].set(stats.kv_cache_bytes_total - stats.kv_cache_bytes_used, tags=tags)
        m["pagedserve_kv_cache_free_blocks"].set(stats.num_free_blocks, tags=tags)
        m["pagedserve_kv_cache_total_blocks"].set(stats.num_total_blocks, tags=tags)
        m["pagedserve_kv_cache_capacity_tokens"].set(stats.num_total_blocks * stats.block_size,
                                                     tags={**tags, "kv_cache_dtype": stats.kv_cache_dtype or "unknown"})
        if stats.num_running == 0 and stats.num_waiting == 0:
            m["pagedserve_batch_fill"].set(0.0, tags=tags)  # idle: no step runs to say so
        totals = {
            "vllm_prompt_tokens": stats.num_prompt_tokens_total,
            "vllm_generation_tokens": stats.num_generation_tokens_total,
            "vllm_num_preemptions": stats.num_preemptions_total,
            "vllm_prefix_cache_queries": stats.num_prefix_cache_queries_total,
            "vllm_prefix_cache_hits": stats.num_prefix_cache_hits_total,
            "vllm_spec_decode_num_drafts": stats.spec_decode.num_drafts,
            "vllm_spec_decode_num_draft_tokens": stats.spec_decode.num_draft_tokens,
            "vllm_spec_decode_num_accepted_tokens": stats.spec_decode.num_accepted_tokens,
            "pagedserve_spec_decode_requests_held_back": stats.spec_decode.num_requests_held_back,
            "pagedserve_spec_decode_probes": stats.spec_decode.num_probes,
            "pagedserve_spec_decode_shadow_trials": stats.spec_decode.num_shadow_trials,
            "pagedserve_spec_decode_pipelined_steps": stats.spec_decode.num_pipelined_steps,
            "pagedserve_spec_decode_pipelined_voids": stats.spec_decode.num_pipelined_voids,
            "pagedserve_lora_slot_loads": stats.num_lora_slot_loads_total,
        }
        spec = stats.spec_decode
        spec_steps = dict(zip(SPEC_DECODE_DECISIONS, (spec.num_spec_steps, spec.num_plain_steps_by_rule,
                                                      spec.num_steps_without_proposals,
                                                      spec.num_steps_over_batch_size)))
        with self._lock:
            for name, total in totals.items():
                self._inc_to(name, f"{name}", total, tags)
            for decision, total in spec_steps.items():
                self._inc_to("pagedserve_spec_decode_steps", f"pagedserve_spec_decode_steps/{decision}", total,
                             {**tags, "decision": decision})
            for position, total in enumerate(stats.spec_decode.num_accepted_tokens_per_pos):
                self._inc_to("vllm_spec_decode_num_accepted_tokens_per_pos",
                             f"vllm_spec_decode_num_accepted_tokens_per_pos/{position}", total,
                             {**tags, "position": str(position)})
            for reason, total in stats.finished_by_reason.items():
                self._inc_to("vllm_request_success", f"vllm_request_success/{reason}", total,
                             {**tags, "finished_reason": reason})
            m["pagedserve_decode_prefill_ratio"].set(self._decode_prefill_ratio(time.monotonic()), tags=tags)

    def _inc_to(self, name: str, key: str, total: int, tags: dict[str, str]) -> None:
        delta = total - self._last_totals.get(key, 0)
        if delta > 0:  # engine totals only grow; a smaller one would be a new engine, counted from there
            self._metrics[name].inc(delta, tags=tags)
        self._last_totals[key] = total

    # -- the engine core's delivering thread -----------------------------------------------------
    def observe_step(self, step: StepStats, stats: EngineStats) -> None:
        """Queue one step (no Ray call here: this thread delivers every step's outputs)."""
        with self._lock:
            self._pending_steps.append((step, stats.max_batch_tokens))
            self._recent_steps.append((time.monotonic(), step.num_prefill_tokens, step.num_decode_tokens))

    def record_steps(self) -> None:
        """Record the queued steps: tokens and time per step; batch fill of the last one."""
        with self._lock:
            steps, self._pending_steps = self._pending_steps, deque(maxlen=MAX_PENDING_STEPS)
        m, tags = self._metrics, self._tags
        for step, _ in steps:
            num_tokens = step.num_prefill_tokens + step.num_decode_tokens
            m["vllm_iteration_tokens_total"].observe(num_tokens, tags=tags)
            kind = "mixed" if step.num_prefill_tokens and step.num_decode_tokens else (
                "prefill" if step.num_prefill_tokens else "decode")
            m["pagedserve_step_time_seconds"].observe(step.step_time_s, tags={**tags, "step_kind": kind})
        if steps and steps[-1][1] > 0:
            last, max_batch_tokens = steps[-1]
            m["pagedserve_batch_fill"].set((last.num_prefill_tokens + last.num_decode_tokens) / max_batch_tokens,
                                           tags=tags)

    def _decode_prefill_ratio(self, now: float) -> float:
        while self._recent_steps and now - self._recent_steps[0][0] > self._ratio_window_s:
            self._recent_steps.popleft()
        num_prefill = sum(s[1] for s in self._recent_steps)
        num_decode = sum(s[2] for s in self._recent_steps)
        return num_decode / max(num_prefill, 1)

    # -- one finished request --------------------------------------------------------------------
    def loop_lag(self, lag_s: float) -> None:
        self._metrics["pagedserve_replica_event_loop_lag_seconds"].observe(lag_s, tags=self._tags)

    def observe_request(self, timing: "RequestTiming", lora_name: str | None = None) -> None:
        m, tags = self._metrics, self._tags
        lora_tags = {**tags, "lora_name": lora_name or ""}
        m["pagedserve_lora_requests"].inc(1, tags=lora_tags)
        if timing.num_output_tokens:
            m["pagedserve_lora_generation_tokens"].inc(timing.num_output_tokens, tags=lora_tags)
        if timing.ttft_s is not None:
            m["pagedserve_lora_time_to_first_token_seconds"].observe(timing.ttft_s, tags=lora_tags)
        for itl_s in sample_evenly(timing.inter_token_latencies_s, ITL_SAMPLES_PER_REQUEST):
            m["vllm_inter_token_latency_seconds"].observe(itl_s, tags=tags)
        m["vllm_request_prompt_tokens"].observe(timing.num_prompt_tokens, tags=tags)
        m["vllm_request_generation_tokens"].observe(timing.num_output_tokens, tags=tags)
        for name, value in (
            ("vllm_time_to_first_token_seconds", timing.ttft_s),
            ("vllm_e2e_request_latency_seconds", timing.e2e_s),
            ("vllm_request_queue_time_seconds", timing.queue_time_s),
            ("vllm_request_prefill_time_seconds", timing.prefill_time_s),
            ("vllm_request_decode_time_seconds", timing.decode_time_s),
            ("vllm_request_time_per_output_token_seconds", timing.tpot_s),
            ("vllm_time_per_output_token_seconds", timing.tpot_s),
        ):
            if value is not None:
                m[name].observe(value, tags=tags)


class RequestTiming:
    """What one request's stream showed, for histograms and the per-request log line.

    Times come from the engine's `RequestMetrics` (monotonic seconds, same process as the replica);
    inter-token latencies are measured where the replica receives each delta.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.num_cached_prompt_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.ttft_s: float | None = None
        self.e2e_s: float | None = None
        self.queue_time_s: float | None = None
        self.prefill_time_s: float | None = None
        self.decode_time_s: float | None = None
        self.tpot_s: float | None = None
        self.inter_token_latencies_s: list[float] = []
        self._started_s = time.monotonic()
        self._last_delta_s: float | None = None

    def add_delta(self, output: RequestOutput) -> None:
        now = time.monotonic()
        num_new = sum(len(c.token_ids) for c in output.outputs)
        if num_new:
            if self._last_delta_s is not None:
                self.inter_token_latencies_s.extend([(now - self._last_delta_s) / num_new] * num_new)
            elif num_new > 1:
                # A first delta can carry several tokens (a slow consumer gets queued deltas merged):
                # every token after the first still gets one latency, spread from the engine's
                # first-token time, so the count is always output tokens - 1.
                first = output.metrics.first_token_time if output.metrics is not None else None
                span = max(0.0, now - first) if first is not None else 0.0
                self.inter_token_latencies_s.extend([span / (num_new - 1)] * (num_new - 1))
            self._last_delta_s = now
        self.num_output_tokens += num_new
        self.num_prompt_tokens = len(output.prompt_token_ids)
        reasons = [c.finish_reason for c in output.outputs if c.finish_reason]
        if reasons:
            self.finish_reason = reasons[0]
        if output.finished:
            self._finish(output)

    def _finish(self, output: RequestOutput) -> None:
        self.num_cached_prompt_tokens = output.num_cached_tokens
        timing = output.metrics
        if timing is None:
            return
        self.num_preemptions = timing.num_preemptions
        arrival = timing.arrival_time
        if timing.first_token_time is not None:
            self.ttft_s = timing.first_token_time - arrival
        if timing.first_scheduled_time is not None:
            self.queue_time_s = timing.first_scheduled_time - arrival
            if timing.first_token_time is not None:
                self.prefill_time_s = timing.first_token_time - timing.first_scheduled_time
        end = timing.last_token_time or timing.finished_time
        if end is not None:
            self.e2e_s = end - arrival
        if timing.first_token_time is not None and timing.last_token_time is not None:
            self.decode_time_s = timing.last_token_time - timing.first_token_time
            if self.num_output_tokens > 1:
                self.tpot_s = self.decode_time_s / (self.num_output_tokens - 1)

    def log_fields(self, replica: str, prompt: Any = None) -> dict[str, Any]:
        """One structured log record. The prompt only when the caller passes it (`log_prompts`)."""
        fields: dict[str, Any] = {
            "event": "request_finished",
            "request_id": self.request_id,
            "replica": replica,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.num_prompt_tokens,
            "output_tokens": self.num_output_tokens,
            "cached_prompt_tokens": self.num_cached_prompt_tokens,
            "preemptions": self.num_preemptions,
            "queue_time_s": _rounded(self.queue_time_s),
            "ttft_s": _rounded(self.ttft_s),
            "tpot_s": _rounded(self.tpot_s),
            "total_time_s": _rounded(time.monotonic() - self._started_s if self.e2e_s is None else self.e2e_s),
        }
        if prompt is not None:
            fields["prompt"] = prompt
        return fields


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class IngressMetrics:
    """Requests the ingress refused before any token (by HTTP status), sent again, or lost to a client that
    left; and what the stream channels carried.

    `model` is the served name, as on the replica's series; before the ingress has asked a replica for
    the model's name (a 401 on the very first request) it is the configured name or "default".
    """

    def __init__(self, model_name: str | None, replica: str, api_key_names: Iterable[str] = ()) -> None:
        self._tags = {"model": "default", "replica": replica}
        self._metrics = _make_metrics(INGRESS_METRICS, INGRESS_TAGS)
        self._is_named = False
        self._api_key_names = list(api_key_names)
        if model_name is not None:
            self.set_model_name(model_name)

    def set_model_name(self, model_name: str) -> None:
        """Zero counters start once the name is known, so no zero series is left under "default"."""
        if not self._is_named or model_name != self._tags["model"]:
            self._is_named = True
            self._tags = {**self._tags, "model": model_name}
            _start_counters_at_zero(self._metrics["pagedserve_rejected_requests"],
                                    [{**self._tags, "reason": str(status)} for status in REJECTION_STATUSES])
            for name in ("pagedserve_resent_requests", "pagedserve_client_disconnects",
                         "pagedserve_stream_channel_messages", "pagedserve_stream_channel_deltas"):
                _start_counters_at_zero(self._metrics[name], [self._tags])
            keys = [{**self._tags, "api_key_name": key} for key in self._api_key_names]
            _start_counters_at_zero(self._metrics["pagedserve_api_key_requests"], keys)
            _start_counters_at_zero(self._metrics["pagedserve_api_key_turned_back_requests"], keys)
            _start_counters_at_zero(self._metrics["pagedserve_api_key_tokens"],
                                    [{**tags, "kind": kind} for tags in keys for kind in ("prompt", "completion")])
            _start_counters_at_zero(self._metrics["pagedserve_api_key_rejected_requests"],
                                    [{**tags, "reason": reason} for tags in keys for reason in API_KEY_LIMITS])

    def rejected(self, status_code: int) -> None:
        self._metrics["pagedserve_rejected_requests"].inc(1, tags={**self._tags, "reason": str(status_code)})

    def resent(self) -> None:
        self._metrics["pagedserve_resent_requests"].inc(1, tags=self._tags)

    def client_left(self) -> None:
        self._metrics["pagedserve_client_disconnects"].inc(1, tags=self._tags)

    def key_admitted(self, api_key_name: str, num_prompt_tokens: int) -> None:
        tags = {**self._tags, "api_key_name": api_key_name}
        self._metrics["pagedserve_api_key_requests"].inc(1, tags=tags)
        if num_prompt_tokens > 0:
            self._metrics["pagedserve_api_key_tokens"].inc(num_prompt_tokens, tags={**tags, "kind": "prompt"})

    def key_generated(self, api_key_name: str, num_tokens: int) -> None:
        if num_tokens > 0:
            self._metrics["pagedserve_api_key_tokens"].inc(
                num_tokens, tags={**self._tags, "api_key_name": api_key_name, "kind": "completion"})

    def key_turned_back(self, api_key_name: str) -> None:
        self._metrics["pagedserve_api_key_turned_back_requests"].inc(1, tags={**self._tags, "api_key_name": api_key_name})

    def key_rejected(self, api_key_name: str, reason: str) -> None:
        """`reason`: the limit that refused it (API_KEY_LIMITS) or the HTTP status of another refusal."""
        self._metrics["pagedserve_api_key_rejected_requests"].inc(
            1, tags={**self._tags, "api_key_name": api_key_name, "reason": reason})

    def channel_message(self, num_deltas: int, delay_s: float) -> None:
        self._metrics["pagedserve_stream_channel_messages"].inc(1, tags=self._tags)
        self._metrics["pagedserve_stream_channel_deltas"].inc(num_deltas, tags=self._tags)
        self._metrics["pagedserve_stream_channel_delay_seconds"].observe(delay_s, tags=self._tags)

    def loop_lag(self, lag_s: float) -> None:
        self._metrics["pagedserve_ingress_event_loop_lag_seconds"].observe(lag_s, tags=self._tags)


class RouterMetrics:
    """Routing decisions, refusals and the admission queue of one router (it runs in the caller)."""

    def __init__(self, deployment: str) -> None:
        self._tags = {"deployment": deployment}
        self._metrics = _make_metrics(ROUTER_METRICS, ROUTER_TAGS)
        _start_counters_at_zero(self._metrics["pagedserve_router_refused"],
                                [{**self._tags, "reason": reason} for reason in ROUTER_REFUSALS])
        _start_counters_at_zero(self._metrics["pagedserve_router_lora_affinity"],
                                [{**self._tags, "outcome": outcome} for outcome in ("hit", "miss")])
        self.queue_length(0)

    def routed(self, replica: str) -> None:
        self._metrics["pagedserve_router_decisions"].inc(1, tags={**self._tags, "replica": replica})

    def refused(self, reason: str) -> None:
        self._metrics["pagedserve_router_refused"].inc(1, tags={**self._tags, "reason": reason})

    def lora_routed(self, is_hit: bool) -> None:
        outcome = "hit" if is_hit else "miss"
        self._metrics["pagedserve_router_lora_affinity"].inc(1, tags={**self._tags, "outcome": outcome})

    def queue_length(self, num_waiting: int) -> None:
        self._metrics["pagedserve_router_queue_length"].set(num_waiting, tags=self._tags)
