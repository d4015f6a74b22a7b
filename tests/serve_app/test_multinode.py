"""The service on a Ray cluster of several nodes (`ray.cluster_utils.Cluster`: a head and two worker
raylets on this machine), with `FakeAsyncEngine` replicas: one engine replica on each worker node, the
ingress and the HTTP proxy on the head, streams routed across both nodes, and one worker node removed
under load: every stream on it goes on on the other node from the tokens already sent, none fails. Before
that, the two replicas show prefix-affinity routing in their prefix-cache hit rates.

The nodes hold what decides placement: each worker node has one `engine_slot` (a custom resource each
replica asks for) and no CPU, the head the only CPUs (the ingress asks for half of one). The proxy is
HeadOnly: every node has this machine's address, so proxies on every node would contend for one port.

This module runs a cluster of its own, which cannot share a process with the session's cluster
(tests/serve_app/conftest.py): a driver is connected to one cluster at a time, `Cluster.connect` calls
`ray.init(ignore_reinit_error=True)` and so silently stays on the first, and `serve.start` on a cluster
whose Serve already runs keeps that Serve's HTTP options. So it is marked `slow` (deselected by default;
`make test-slow` runs it alone, about half a minute on two cores, 20 s of it starting the cluster and the
application) and skips where Ray is already initialized in this process. Two clusters in two processes
(`make test` and `make test-slow` at once) do not collide: each picks free ports.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray_harness import FAKE_ENGINE_DIR, build_app_with, free_ports, wait_for, wait_until_healthy  # noqa: E402

import prefix_workload  # noqa: E402

APP = "multinode"
NUM_TOKENS = 20  # "SLOW": 0.2 s a token, so a stream runs 4 s and a node can be removed in the middle of it
NUM_STREAMS = 8


@pytest.fixture(scope="module")
def cluster(tiny_model_path: str):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process (the session cluster): run this module alone, "
                    "`make test-slow`")
    previous_auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # A lost node is declared dead after 3 missed 0.3 s health checks, not Ray's default of several seconds.
    system_config = {"health_check_period_ms": 300, "health_check_failure_threshold": 3,
                     "health_check_initial_delay_ms": 0}
    ray_cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "_system_config": system_config})
    workers = [ray_cluster.add_node(num_cpus=0, resources={"engine_slot": 1}) for _ in range(2)]
    try:
        ray.init(address=ray_cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": FAKE_ENGINE_DIR}})
        (http_port,) = free_ports(1)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
        app = build_app_with(
            {"engine_class": "fake_engine:FakeAsyncEngine", "model": tiny_model_path, "max_model_len": 256,
             "block_size": 16, "num_blocks": 64, "num_replicas": 2, "use_gpu": False,
             "router": {"stats_period_s": 0.2}},
            ray_actor_options={"num_cpus": 0, "resources": {"engine_slot": 1}}, health_check_period_s=1)
        serve.run(app, name=APP, route_prefix=f"/{APP}", blocking=False)
        base = f"http://127.0.0.1:{http_port}/{APP}"
        wait_until_healthy(base, timeout_s=120)
        yield {"cluster": ray_cluster, "workers": workers, "base": base, "model": tiny_model_path}
    finally:
        ray.shutdown()
        ray_cluster.shutdown()
        if previous_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth_mode


def _replica_nodes() -> dict[str, str]:
    """Node id of each live engine replica actor, by actor name (Ray's actor table, read from the GCS: the
    state API would need the dashboard, which this cluster does without)."""
    from ray._private.state import actors

    return {info["Name"]: info["Address"]["NodeID"] for info in actors(actor_state_name="ALIVE").values()
            if "EngineReplica" in info["Name"]}


def _stream(base: str, model: str, prompt: str, on_first_token: concurrent.futures.Future | None = None
            ) -> tuple[int, str, list[str]]:
    """(status, text, error events) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": NUM_TOKENS, "seed": 4, "stream": True}
    events: list[str] = []
    with httpx.Client(base_url=base, timeout=120) as client, client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, response.text, []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if on_first_token is not None and not on_first_token.done():
                    on_first_token.set_result(None)
    errors = [e for e in events if '"error"' in e] + ([] if events[-1:] == ["[DONE]"] else ["no [DONE]"])
    text = "".join(c["text"] for e in events if e != "[DONE]" and '"error"' not in e for c in json.loads(e)["choices"])
    return 200, text, errors


def test_shared_prefixes_go_to_the_replica_that_caches_them(cluster) -> None:
    """Prefix-affinity routing through Ray (issue 28's bar): ten long prefixes, visited three times in turn,
    together about twice what one replica caches. The router sends each prefix where it went first and
    spreads new ones over the replicas, so each replica keeps its half cached: the replicas' own stats show a
    prompt-token hit rate at least twice what random routing gets on the same prompts with the same cache
    model (bench/prefix_affinity_bench.py measures random routing through Ray too). Runs before the node
    removal below, which leaves one replica."""
    from transformers import AutoTokenizer

    base, model = cluster["base"], cluster["model"]
    handle = serve.get_deployment_handle("EngineReplica", APP)

    def stats_by_replica() -> dict[str, dict]:
        seen: dict[str, dict] = {}
        for _ in range(50):  # calls without a demand go to the least busy replica, ties at random
            stats = handle.serving_stats.remote().result(timeout_s=30)
            seen[stats["replica"]] = stats
            if len(seen) == 2:
                return seen
        raise AssertionError(f"only replicas {sorted(seen)} answered")

    workload = prefix_workload.prompts(AutoTokenizer.from_pretrained(model))
    before = stats_by_replica()
    with httpx.Client(base_url=base, timeout=60) as client:
        for prompt in workload:
            response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1})
            assert response.status_code == 200, response.text
    after = stats_by_replica()
    queries = {r: after[r]["prefix_cache_queries"] - before[r]["prefix_cache_queries"] for r in after}
    hits = {r: after[r]["prefix_cache_hits"] - before[r]["prefix_cache_hits"] for r in after}
    assert sum(queries.values()) == sum(len(prompt) for prompt in workload)
    assert all(queries.values()), queries  # both replicas served
    measured = prefix_workload.hit_rate(sum(queries.values()), sum(hits.values()))
    random_routing = prefix_workload.random_routing_hit_rate(workload)
    assert measured >= 2 * random_routing, (measured, random_routing, hits, queries)


def test_replicas_on_two_nodes_serve_and_a_node_removed_under_load_costs_no_stream(cluster) -> None:
    base, model = cluster["base"], cluster["model"]
    worker_ids = {node.node_id for node in cluster["workers"]}

    def placed() -> dict[str, str]:
        nodes = _replica_nodes()
        return nodes if len(nodes) == 2 else {}

    nodes = wait_for(placed, 30, "two engine replicas alive")
    assert set(nodes.values()) == worker_ids  # one on each worker node

    firsts = [concurrent.futures.Future() for _ in range(NUM_STREAMS)]
    with concurrent.futures.ThreadPoolExecutor(NUM_STREAMS) as pool:
        streams = [pool.submit(_stream, base, model, f"SLOW stream {i} end", firsts[i]) for i in range(NUM_STREAMS)]
        concurrent.futures.wait(firsts, timeout=60)
        assert all(first.done() for first in firsts), "every stream had its first token before the node went"
        # Both replicas hold streams now (the router spreads them by free blocks); the first worker goes,
        # raylet, replica and all, as a node lost to a crash or a spot reclaim does.
        removed = cluster["workers"][0]
        started_s = time.monotonic()
        cluster["cluster"].remove_node(removed, allow_graceful=False)
        results = [stream.result() for stream in streams]
        streams_s = time.monotonic() - started_s

    failed = [result for result in results if result[0] != 200 or result[2]]
    assert not failed, failed
    status, reference, errors = _stream(base, model, "FAST reference end")
    assert status == 200 and not errors
    assert [text for _, text, _ in results] == [reference] * NUM_STREAMS
    assert streams_s < 30
    # The surviving node's replica served all of it; the lost one's replacement has no node with a slot.
    assert set(_replica_nodes().values()) == {cluster["workers"][1].node_id}
