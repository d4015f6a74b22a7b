"""The engine-load autoscaling policy (serve_app/autoscaling.py) as plain arithmetic and behind Serve's
`AutoscalingContext`, without a cluster. tests/serve_app/test_autoscaling_service.py scales a deployment
with it through Ray."""

from __future__ import annotations

import math

import pytest

from pagedserve.serve_app.autoscaling import (
    INGRESS_HELD_TTL_S,
    KV_CACHE_USAGE_METRIC,
    NUM_HELD_IN_INGRESSES_METRIC,
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


def test_requests_held_in_the_ingresses_fair_queues_count_as_waiting(tiny_model_path, monkeypatch) -> None:
    """Requests an ingress's fair queue holds back never reach its handle, whose queue Serve counts: each request
    it sends carries the count, the replica reports each ingress's latest (forgetting one not heard from within
    the TTL), and the policy adds the largest report to the waiting requests."""
    import asyncio
    import sys
    from pathlib import Path

    pytest.importorskip("ray")
    from ray import serve

    from pagedserve.config.serve import ServeArgs
    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.serve_app import replica as replica_module
    from pagedserve.serve_app.messages import GenerateRequest

    monkeypatch.setattr(serve, "get_replica_context", lambda: None)  # outside a deployment
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # fake_engine
    replica = replica_module.EngineReplica(ServeArgs.from_args(
        {"model": tiny_model_path, "engine_class": "fake_engine:FakeAsyncEngine"}))
    sys.modules.pop("fake_engine", None)

    async def send(request_id: str, ingress: str, num_held: int) -> None:
        request = GenerateRequest(request_id, [5, 6, 7], SamplingParams(max_tokens=1, ignore_eos=True), 3,
                                  max_new_tokens=1, reply_to=ingress, num_held_by_ingress=num_held)
        async for _ in replica.submit(request):
            pass

    assert replica.record_autoscaling_stats()[NUM_HELD_IN_INGRESSES_METRIC] == 0
    for request_id, ingress, num_held in [("r1", "i1", 7), ("r2", "i1", 3), ("r3", "i2", 2)]:
        asyncio.run(send(request_id, ingress, num_held))
    assert replica.record_autoscaling_stats()[NUM_HELD_IN_INGRESSES_METRIC] == 5  # each ingress's latest
    now = replica_module.time.monotonic()
    monkeypatch.setattr(replica_module.time, "monotonic", lambda: now + INGRESS_HELD_TTL_S + 1)
    assert replica.record_autoscaling_stats()[NUM_HELD_IN_INGRESSES_METRIC] == 0

    policy = EngineLoadPolicy(target_ongoing_requests=8, target_kv_cache_usage=0.5, max_waiting_per_replica=1.0)
    metrics = {KV_CACHE_USAGE_METRIC: {"a": 0.2, "b": 0.2}, NUM_RUNNING_METRIC: {"a": 4, "b": 4},
               NUM_WAITING_METRIC: {"a": 0, "b": 0}, NUM_HELD_IN_INGRESSES_METRIC: {"a": 5, "b": 4}}
    desired, state = policy(Context(2, metrics, queued=1))
    assert state["pagedserve_load"]["waiting"] == 6.0 and state["pagedserve_load"]["requests"] == 14.0
    assert desired == 3  # 6 waiting on 2 replicas is over max_waiting_per_replica: one more
    del metrics[NUM_HELD_IN_INGRESSES_METRIC]
    assert policy(Context(2, metrics, queued=1))[0] == pytest.approx(1.125)  # what Serve alone would show
