"""The engine-load autoscaling policy (serve_app/autoscaling.py) as plain arithmetic and behind Serve's
`AutoscalingContext`, without a cluster. tests/serve_app/test_autoscaling_service.py scales a deployment
with it through Ray."""

from __future__ import annotations

import math

import pytest

from pagedserve.serve_app.autoscaling import (
    KV_CACHE_USAGE_METRIC,
    NUM_RUNNING_METRIC,
    NUM_WAITING_METRIC,
    EngineLoad,
    EngineLoadPolicy,
    LoadTargets,
    desired_replicas,
)

TARGETS = LoadTargets(target_ongoing_requests=8, target_kv_cache_usage=0.5, max_waiting_per_replica=1.0)


def _load(num_replicas: int, kv: tuple[float, ...] = (), running: float = 0, waiting: float = 0,
          queued: float = 0) -> EngineLoad:
    return EngineLoad(num_replicas, kv or (0.0,) * num_replicas, running, waiting, queued)


@pytest.mark.parametrize("load, expected", [
    (_load(2), 0),  # idle: Serve clips it to min_replicas
    (_load(1, running=16), 2),  # requests per replica
    (_load(1, running=4, queued=12), 2),  # requests queued in the ingress count as requests
    (_load(2, kv=(0.9, 0.6), running=4), 3),  # KV: 1.5 replicas' worth of blocks held, at a target of 0.5
    (_load(2, running=2, waiting=3), 3),  # requests waiting (1.5 per replica): one more, whatever the rest says
    (_load(3, running=2, waiting=3), 1),  # 1 per replica is tolerated: the requests alone want one replica
    (_load(3, kv=(0.2, 0.1, 0.0), running=3), 1),  # little load on three: one is enough
])
def test_desired_replicas_is_the_largest_demand(load: EngineLoad, expected: int) -> None:
    assert math.ceil(desired_replicas(load, TARGETS)) == expected


class Context:
    """The parts of Serve's AutoscalingContext the policy reads."""

    def __init__(self, num_replicas: int, metrics: dict, queued: float) -> None:
        self.current_num_replicas = num_replicas
        self.aggregated_metrics = metrics
        self.total_queued_requests = queued


def test_the_policy_reads_the_replicas_signals_and_the_handles_queue() -> None:
    policy = EngineLoadPolicy(target_ongoing_requests=8, target_kv_cache_usage=0.5, max_waiting_per_replica=1.0)
    metrics = {KV_CACHE_USAGE_METRIC: {"a": 1.0, "b": 0.9}, NUM_RUNNING_METRIC: {"a": 4, "b": 4},
               NUM_WAITING_METRIC: {"a": 0, "b": 1}}
    desired, state = policy(Context(2, metrics, queued=5))
    assert desired == pytest.approx(3.8)  # KV: 1.9 / 0.5; the 6 waiting want 3, the 14 requests 1.75
    assert state["pagedserve_load"] == {"requests": 14.0, "kv_cache_usage": 1.9, "waiting": 6.0}
    # A replica that has not reported yet counts as empty; no metrics at all is an idle deployment.
    assert policy(Context(3, {}, queued=0))[0] == 0
