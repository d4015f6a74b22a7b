"""The service's metric names, types, buckets and labels, and the series names a scrape shows: what the
recording code (serve_app/metrics.py), the Grafana dashboard and the alert rules agree on.

Names follow vLLM's so that dashboards and alerts written for vLLM carry over. Ray no longer accepts ':'
in names, so `vllm:num_requests_running` is recorded as `vllm_num_requests_running`, the same rewrite
vLLM's own Ray stat logger applies; the agent then prefixes `ray_` and counters get `_total`. What a
scrape shows is therefore `ray_vllm_num_requests_running`, `ray_vllm_prompt_tokens_total`,
`ray_vllm_time_to_first_token_seconds_bucket`, ..., which is also what Ray's own Serve LLM Grafana
dashboard queries. `SCRAPED_NAMES` lists every series name a scrape carries; a test checks that the
Grafana dashboard queries nothing else.

Labels: engine-replica and ingress series carry `model` and `replica` (replica series also `model_name`,
vLLM's label, so vLLM dashboards filter); router series carry `deployment` (and the target `replica`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

RAY_PREFIX = "ray_"

# Seconds: from a few ms (a decode step of a small model) to minutes (a long generation behind a queue).
LATENCY_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0]
STEP_TIME_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
TOKEN_COUNT_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# Seconds a token waits in the service between the engine and the client (a stream channel's transit, an event
# loop's lag): fine below 10 ms, where an engine step's gap sits, so a p99 shows whether a hop adds a step.
DELAY_BUCKETS_S = [0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0]
DELAY_HISTOGRAMS = ("pagedserve_stream_channel_delay_seconds", "pagedserve_replica_event_loop_lag_seconds",
                    "pagedserve_ingress_event_loop_lag_seconds")

REPLICA_TAGS = ("model", "model_name", "replica")
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECTION_STATUSES = (400, 401, 404, 408, 413, 429, 500, 503)
# What decided a step with requests that may speculate (engine/spec/adaptive.py; docs/speculative.md).
SPEC_DECODE_DECISIONS = ("speculated", "plain_by_rule", "no_proposals", "over_batch_size")
ROUTER_REFUSALS = ("queue_full", "queue_timeout", "too_large")
# Why a key's request was refused: its own limits (429), or the HTTP status of any other refusal.
API_KEY_LIMITS = ("requests_per_s", "tokens_per_min")

# name -> (kind, description, extra tag keys); the recorded (Ray) name, without `ray_` or `_total`.
REPLICA_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # vLLM-compatible gauges
    "vllm_num_requests_running": ("gauge", "Requests in the running batch.", ()),
    "vllm_num_requests_waiting": ("gauge", "Requests waiting to be scheduled (new and preempted).", ()),
    "vllm_kv_cache_usage_perc": ("gauge", "Fraction of KV-cache blocks in use, 0..1.", ()),
    "vllm_gpu_cache_usage_perc": ("gauge", "Same as vllm_kv_cache_usage_perc (vLLM v0 name).", ()),
    # vLLM-compatible counters
    "vllm_prompt_tokens": ("counter", "Prompt tokens computed (prefill), including recomputation.", ()),
    "vllm_generation_tokens": ("counter", "Tokens generated.", ()),
    "vllm_request_success": ("counter", "Requests finished, by finished_reason (stop, length, abort, error).",
                             ("finished_reason",)),
    "vllm_num_preemptions": ("counter", "Preemptions (a request's blocks freed, to be recomputed).", ()),
    "vllm_prefix_cache_queries": ("counter", "Prompt tokens looked up in the prefix cache.", ()),
    "vllm_prefix_cache_hits": ("counter", "Prompt tokens served from the prefix cache.", ()),
    "vllm_spec_decode_num_drafts": ("counter", "Speculative verifications (a request's proposals scored once).", ()),
    "vllm_spec_decode_num_draft_tokens": ("counter", "Speculative tokens proposed.", ()),
    "vllm_spec_decode_num_accepted_tokens": ("counter", "Speculative tokens accepted (the target chose them too).", ()),
    "vllm_spec_decode_num_accepted_tokens_per_pos": (
        "counter", "Speculative tokens accepted, by position in the proposal (0: the first).", ("position",)),
    "pagedserve_spec_decode_steps": (
        "counter", "Steps by what decided their speculation: speculated (proposals verified), plain_by_rule (the "
        "adaptive rule found no plan faster than plain decoding), no_proposals (asked, none to verify), "
        "over_batch_size (more running requests than speculative_disable_batch_size).", ("decision",)),
    "pagedserve_spec_decode_requests_held_back": (
        "counter", "Requests that could speculate, left out of a step by the adaptive rule.", ()),
    "pagedserve_spec_decode_probes": (
        "counter", "Requests whose acceptance had collapsed, tried again by the adaptive rule.", ()),
    "pagedserve_spec_decode_shadow_trials": (
        "counter", "N-gram lookups for requests the adaptive rule held back, scored as their tokens arrive.", ()),
    "pagedserve_spec_decode_pipelined_steps": (
        "counter", "Verification steps launched before the one before them delivered, on the guess that it accepts "
        "every proposal and samples the token the n-gram lookup expects.", ()),
    "pagedserve_spec_decode_pipelined_voids": (
        "counter", "Requests whose rows in a pipelined verification step were dropped: the guess was wrong.", ()),
    # vLLM-compatible histograms
    "vllm_time_to_first_token_seconds": ("histogram", "Arrival at the engine to first token.", ()),
    "vllm_inter_token_latency_seconds": ("histogram", "Time between consecutive output deltas, per token.", ()),
    "vllm_request_time_per_output_token_seconds": (
        "histogram", "Per request: (last token - first token) / (output tokens - 1).", ()),
    "vllm_time_per_output_token_seconds": (
        "histogram", "Same as vllm_request_time_per_output_token_seconds (older vLLM name).", ()),
    "vllm_e2e_request_latency_seconds": ("histogram", "Arrival at the engine to the last token.", ()),
    "vllm_request_queue_time_seconds": ("histogram", "Arrival to first scheduled.", ()),
    "vllm_request_prefill_time_seconds": ("histogram", "First scheduled to first token.", ()),
    "vllm_request_decode_time_seconds": ("histogram", "First token to last token.", ()),
    "vllm_request_prompt_tokens": ("histogram", "Prompt tokens of finished requests.", ()),
    "vllm_request_generation_tokens": ("histogram", "Output tokens of finished requests (all n completions).", ()),
    "vllm_iteration_tokens_total": ("histogram", "Tokens computed per engine step.", ()),
    # ours
    "pagedserve_num_requests_preempted_waiting": ("gauge", "Preempted requests waiting to be recomputed.", ()),
    "pagedserve_kv_cache_bytes_used": ("gauge", "KV-cache bytes in blocks that are in use.", ()),
    "pagedserve_kv_cache_bytes_free": ("gauge", "KV-cache bytes in free blocks.", ()),
    "pagedserve_kv_cache_free_blocks": ("gauge", "Free KV-cache blocks (most constrained layer group).", ()),
    "pagedserve_kv_cache_total_blocks": ("gauge", "KV-cache blocks in all.", ()),
    "pagedserve_kv_cache_capacity_tokens": (
        "gauge", "Tokens of context the KV cache holds (total blocks x block size), by what it stores "
        "(kv_cache_dtype: the model's dtype, or fp8_e4m3).", ("kv_cache_dtype",)),
    "pagedserve_batch_fill": ("gauge", "Tokens in the last step / max_batch_tokens, 0..1.", ()),
    # Per LoRA adapter; the base model's requests count under lora_name "" (docs/lora.md).
    "pagedserve_lora_requests": ("counter", "Requests finished, by LoRA adapter (\"\": the base model).",
                                 ("lora_name",)),
    "pagedserve_lora_generation_tokens": ("counter", "Output tokens of finished requests, by LoRA adapter.",
                                          ("lora_name",)),
    "pagedserve_lora_time_to_first_token_seconds": (
        "histogram", "Arrival at the engine to first token, by LoRA adapter.", ("lora_name",)),
    "pagedserve_lora_slot_loads": (
        "counter", "LoRA adapters copied into one of the engine's max_loras device slots (each evicts the least "
        "recently used when the slots are full): adapter churn.", ()),
    "pagedserve_decode_prefill_ratio": (
        "gauge", "Decode tokens / prefill tokens over the recent window (prefill floored at 1 token).", ()),
    "pagedserve_step_time_seconds": (
        "histogram", "Engine step time, by step kind (prefill, decode, mixed).", ("step_kind",)),
    "pagedserve_replica_event_loop_lag_seconds": (
        "histogram", "How late the engine replica's event loop woke from a 20 ms sleep (serve_app/loop_lag.py): "
        "every stream's deltas pass through that loop, so a hold of it delays them all.", ()),
}

INGRESS_TAGS = ("model", "replica")
INGRESS_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pagedserve_rejected_requests": (
        "counter", "Requests answered with an error, by HTTP status: before generating (400, 401, 404, 413, 429, "
        "503), or a non-streamed request past request_timeout_s (408) or failed in the engine (500).",
        ("reason",)),
    "pagedserve_resent_requests": (
        "counter", "Engine requests sent again because their replica (its process or its engine) was lost: from "
        "the start before their first token, else continued from the tokens received.", ()),
    "pagedserve_client_disconnects": (
        "counter", "Requests whose client went away before the end of the response (the engine request is "
        "aborted, its blocks freed).", ()),
    "pagedserve_stream_channel_messages": (
        "counter", "Messages received on the stream channels from the engine replicas (each carries every "
        "delta a replica produced for this ingress's requests since the previous one).", ()),
    "pagedserve_stream_channel_deltas": ("counter", "Request deltas received on the stream channels.", ()),
    "pagedserve_stream_channel_delay_seconds": (
        "histogram", "From an engine replica sending a stream channel message to this ingress receiving it (the "
        "two processes' wall clocks: across nodes, as close as their clocks are kept).", ()),
    "pagedserve_ingress_event_loop_lag_seconds": (
        "histogram", "How late the ingress replica's event loop woke from a 20 ms sleep (serve_app/loop_lag.py): "
        "every stream of the replica is written from that loop, so a hold of it delays them all.", ()),
    # Per API key, by its configured name (never the key): serve_app/tenants.py.
    "pagedserve_api_key_requests": (
        "counter", "Requests of an API key admitted past its limits (sent to the engine replicas).", ("api_key_name",)),
    "pagedserve_api_key_tokens": (
        "counter", "Tokens of an API key's requests, by kind (prompt, completion).", ("api_key_name", "kind")),
    "pagedserve_api_key_turned_back_requests": (
        "counter", "Sends of an API key's requests turned back over the key's share of the KV cache, by the router "
        "or by an engine replica (when several ingresses together sent the key past it); each waits in the "
        "ingress's fair queue and is sent again (docs/deploy.md, shares of the KV cache).", ("api_key_name",)),
    "pagedserve_api_key_rejected_requests": (
        "counter", "Requests of an API key refused before generating: by its own limits (reason requests_per_s or "
        "tokens_per_min, 429 with Retry-After) or else by HTTP status (400, 404, 413, 429, 503, ...).",
        ("api_key_name", "reason")),
}

ROUTER_TAGS = ("deployment",)
ROUTER_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pagedserve_router_decisions": ("counter", "Requests routed, by target replica.", ("replica",)),
    "pagedserve_router_refused": (
        "counter", "Requests the router refused: queue_full, queue_timeout (both 429) or too_large (400).",
        ("reason",)),
    "pagedserve_router_queue_length": ("gauge", "Requests waiting in the router for a replica with room.", ()),
    "pagedserve_router_lora_affinity": (
        "counter", "LoRA requests routed, by outcome: hit (the replica had the adapter in a device slot, or was "
        "just sent a request under it) or miss (it loads it into a slot).",
        ("outcome",)),
}


def scraped_names(name: str, kind: str) -> list[str]:
    """Series names the Ray metrics agent exposes for one recorded metric."""
    base = RAY_PREFIX + name
    if kind == "counter":
        return [base + "_total"]
    if kind == "histogram":
        return [base + "_bucket", base + "_sum", base + "_count"]
    return [base]


SCRAPED_NAMES: frozenset[str] = frozenset(
    scraped
    for table in (REPLICA_METRICS, INGRESS_METRICS, ROUTER_METRICS)
    for name, (kind, _, _) in table.items()
    for scraped in scraped_names(name, kind)
)


def metric_names_in_promql(expressions: Iterable[str]) -> set[str]:
    """Metric names an expression list refers to (identifiers followed by `{`, `[` or a space/paren)."""
    names: set[str] = set()
    for expr in expressions:
        for match in re.finditer(r"\b((?:ray|vllm|pagedserve)_[a-zA-Z0-9_:]+)", expr):
            names.add(match.group(1))
    return names
