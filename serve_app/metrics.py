"""Prometheus metrics of one replica's engine, exported through Ray's metrics agent.

`ReplicaMetrics.observe` is fed the `EngineStats` snapshot the replica already takes for routing, so
metrics cost no extra engine calls. Counters in `EngineStats` are totals since start; they are exported
as gauges (`*_total`) because Ray's Counter only accepts increments and a restarted replica restarts them.
"""

from __future__ import annotations

from pagedserve.engine.stats import EngineStats

_GAUGES: dict[str, str] = {
    "num_free_blocks": "Free KV-cache blocks.",
    "num_total_blocks": "KV-cache blocks in all.",
    "kv_cache_usage": "Fraction of KV-cache blocks in use (0..1).",
    "num_running": "Requests in the running batch.",
    "num_waiting": "Requests waiting for blocks.",
    "num_prompt_tokens_total": "Prompt tokens processed since start.",
    "num_generation_tokens_total": "Tokens generated since start.",
    "num_preemptions_total": "Preemptions since start.",
    "num_prefix_cache_hits_total": "Prompt tokens served by the prefix cache since start.",
    "num_prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache since start.",
}


class ReplicaMetrics:
    """Gauges tagged with model and replica. Without a Ray metrics agent (plain tests) they are no-ops."""

    def __init__(self, model_name: str, replica: str) -> None:
        self._tags = {"model": model_name, "replica": replica}
        self._gauges: dict[str, object] = {}
        try:
            from ray.util.metrics import Gauge

            for name, description in _GAUGES.items():
                self._gauges[name] = Gauge(
                    f"pagedserve_{name}", description=description, tag_keys=("model", "replica")
                )
        except Exception:  # metrics are best effort; serving must not depend on them
            self._gauges = {}

    def observe(self, stats: EngineStats) -> None:
        for name, gauge in self._gauges.items():
            value = getattr(stats, name, None)
            if value is not None:
                gauge.set(float(value), tags=self._tags)  # type: ignore[attr-defined]
