"""Several ingress replicas in front of one engine replica (`ingress_num_replicas`, the default on GPUs).

Each ingress runs its own free-blocks router with its own reservations; the engine replica's reports
are what they share. Concurrent requests through both must all be answered, and every block must come
back when they are done.
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray_harness import fake_engine_app, wait_for  # noqa: E402

NUM_BLOCKS = 64
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model_path: str):
    args = {
        "model": tiny_model_path, "max_model_len": 512,
        "block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS, "num_cpus_per_replica": 1,
        "ingress_num_replicas": 2, "router": {"stats_period_s": 0.5, "max_queued_requests": 64},
    }
    with fake_engine_app(ray_cluster, "ingress2", args) as base:
        yield {"base": base, "model": tiny_model_path}


def _running_replicas(deployment: str) -> int:
    status = serve.status().applications["ingress2"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_two_ingress_replicas_answer_concurrent_requests_and_return_every_block(service) -> None:
    assert _running_replicas("OpenAIIngress") == 2 and _running_replicas("EngineReplica") == 1

    def one(index: int) -> tuple[int, int]:
        """(status, completion tokens) of one request; even ones stream, with usage in the last chunk."""
        stream = index % 2 == 0
        body = {"model": service["model"], "prompt": f"request {index}", "max_tokens": 8, "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})}
        with httpx.Client(base_url=service["base"], timeout=60) as client:
            response = client.post("/v1/completions", json=body)
        if response.status_code != 200:
            return response.status_code, 0
        if not stream:
            return 200, response.json()["usage"]["completion_tokens"]
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return 200, json.loads(events[-2])["usage"]["completion_tokens"]

    # 32 requests of 1 block each (prompt + 8 tokens <= 16) in flight together fit the 64 blocks.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert [status for status, _ in results] == [200] * 32
    assert [tokens for _, tokens in results] == [8] * 32

    handle = serve.get_deployment_handle("EngineReplica", "ingress2")
    infos: list[dict] = []

    def every_block_free() -> bool:
        infos.append(handle.health.remote().result())
        return infos[-1]["num_free_blocks"] == infos[-1]["num_total_blocks"] == NUM_BLOCKS

    wait_for(every_block_free, 10, lambda: f"all {NUM_BLOCKS} blocks back; last health: {infos[-1:]}")
