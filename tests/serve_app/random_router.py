"""The product's router with placement by a coin, for prefix-affinity benchmarks: a request goes to a random
replica among those with room (free blocks, fair shares, queueing and stream channels as the product's).
Workers import it through PYTHONPATH, as fake_engine (tests/ray_harness.py)."""

from __future__ import annotations

import random
from typing import Any

from pagedserve.config.serve import RouterSettings
from pagedserve.serve_app.messages import RoutingDemand
from pagedserve.serve_app.router import FreeBlocksPolicy, FreeBlocksRequestRouter, ReplicaKey, RouteDecision


class RandomPlacementPolicy(FreeBlocksPolicy):
    def decide(self, candidates: list[ReplicaKey], demand: RoutingDemand | None) -> RouteDecision:
        decision = super().decide(candidates, demand)
        if demand is None or decision.kind != "route":
            return decision
        return RouteDecision("route", random.sample(decision.replicas, len(decision.replicas)))


class RandomPlacementRouter(FreeBlocksRequestRouter):
    def initialize_state(self, **router_kwargs: Any) -> None:
        super().initialize_state(**router_kwargs)
        self.policy = RandomPlacementPolicy(RouterSettings(**router_kwargs))
