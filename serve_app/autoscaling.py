"""Scale the engine replicas on what the engines report, not on Serve's count of ongoing calls.

Serve's default rule counts calls in flight per replica; here that count is wrong twice over: each ingress
keeps one stream channel open per engine replica (serve_app/stream_channel.py), with the Ray transport a call
that never ends and means no load, and a request that no replica has KV room for waits in the ingress's admission queue
(serve_app/router.py) before any call exists. So each replica reports its engine's state to Serve
(`EngineReplica.record_autoscaling_stats`, the `*_METRIC` names below), Serve's controller averages every
signal over `look_back_period_s` and calls `EngineLoadPolicy`, which wants the largest of:

- requests per replica: (running + waiting in the engines + queued in the ingress handles + held in the
  ingresses' fair queues) / `target_ongoing_requests`;
- KV pressure: the replicas' summed share of KV blocks held (the router's worst case: what their requests
  hold or will hold) / `target_kv_cache_usage`;
- one replica more than now, while more than `max_waiting_per_replica` requests per replica wait.

With several API keys the ingress holds requests back before they reach its handle (serve_app/fair_queue.py),
where Serve's count of queued requests does not see them. Each request it sends carries how many it holds
then; each replica reports the latest count of every ingress it heard from within `INGRESS_HELD_TTL_S`
(`NUM_HELD_IN_INGRESSES_METRIC`), and the policy takes the largest report: every replica hears from every
ingress as requests spread, and a sum over replicas would count one ingress's requests once per replica.

Serve then applies what it applies to every policy: the change must be wanted for `upscale_delay_s` /
`downscale_delay_s` in a row, and the result is clipped to `min_replicas..max_replicas`. Idle replicas
report zeros, so the wanted count falls to the minimum.

Two parts, as in router.py: `desired_replicas` is plain arithmetic on an `EngineLoad` (tested without Ray);
`EngineLoadPolicy` reads Serve's `AutoscalingContext` into one. Ray pickles this module by value into the
controller (`AutoscalingPolicy.serialize_policy`), so it imports nothing of pagedserve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The names of the replica's autoscaling signals (`EngineReplica.record_autoscaling_stats`).
KV_CACHE_USAGE_METRIC = "kv_cache_usage"  # share of KV blocks held, worst case (0..1)
NUM_RUNNING_METRIC = "num_running"  # requests the engine runs
NUM_WAITING_METRIC = "num_waiting"  # requests the engine holds but does not run yet
NUM_HELD_IN_INGRESSES_METRIC = "num_held_in_ingresses"  # requests the ingresses' fair queues hold back
# How long a replica keeps an ingress's count of held requests without hearing from it again.
INGRESS_HELD_TTL_S = 30.0


@dataclass(frozen=True)
class LoadTargets:
    """What one replica should carry (AutoscalingSettings of config/serve.py)."""

    target_ongoing_requests: float
    target_kv_cache_usage: float
    max_waiting_per_replica: float


@dataclass(frozen=True)
class EngineLoad:
    """The deployment's load, each signal averaged over Serve's look-back window. Replicas that have not
    reported yet (just started) count as empty."""

    num_replicas: int  # running replicas
    kv_cache_usage: tuple[float, ...]  # per reporting replica
    num_running: float  # summed over replicas
    num_waiting: float  # summed over replicas: requests in the engines' queues
    num_queued: float  # requests waiting in the ingresses' handles for a replica with room
    num_held_in_ingresses: float = 0.0  # requests held in the ingresses' fair queues, before their handles

    @property
    def num_requests(self) -> float:
        return self.num_running + self.num_waiting + self.num_queued + self.num_held_in_ingresses


def desired_replicas(load: EngineLoad, targets: LoadTargets) -> float:
    """How many replicas `load` wants (a float: Serve rounds it up, then applies delays and bounds)."""
    by_requests = load.num_requests / targets.target_ongoing_requests
    by_kv_cache = sum(load.kv_cache_usage) / targets.target_kv_cache_usage
    desired = max(by_requests, by_kv_cache)
    num_waiting = load.num_waiting + load.num_queued + load.num_held_in_ingresses
    if load.num_replicas > 0 and num_waiting / load.num_replicas > targets.max_waiting_per_replica:
        desired = max(desired, load.num_replicas + 1)  # waiting requests are latency now: one more at least
    return desired


class EngineLoadPolicy:
    """Ray Serve's custom autoscaling policy (`AutoscalingConfig.policy`, a class Serve instantiates once with
    `policy_kwargs`, the fields of `LoadTargets`). Runs in Serve's controller every control-loop tick."""

    def __init__(self, **policy_kwargs: Any) -> None:
        self.targets = LoadTargets(**policy_kwargs)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}

        def summed(name: str) -> float:
            return float(sum(metrics.get(name, {}).values()))

        load = EngineLoad(
            num_replicas=ctx.current_num_replicas,
            kv_cache_usage=tuple(float(v) for v in metrics.get(KV_CACHE_USAGE_METRIC, {}).values()),
            num_running=summed(NUM_RUNNING_METRIC),
            num_waiting=summed(NUM_WAITING_METRIC),
            num_queued=float(ctx.total_queued_requests or 0.0),
            num_held_in_ingresses=float(max(metrics.get(NUM_HELD_IN_INGRESSES_METRIC, {}).values(), default=0.0)),
        )
        # The state is only for whoever reads the controller's policy state: the load behind the decision.
        return desired_replicas(load, self.targets), {
            "pagedserve_load": {"requests": load.num_requests, "kv_cache_usage": sum(load.kv_cache_usage),
                                "waiting": load.num_waiting + load.num_queued + load.num_held_in_ingresses}}
