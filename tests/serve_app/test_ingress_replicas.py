"""Several ingress replicas in front of one engine replica (`ingress_num_replicas`, the default on GPUs).

Each ingress runs its own free-blocks router with its own reservations; the engine replica's reports
are what they share. Concurrent requests through both must all be answered, and every block must come
back when they are done. A LoRA adapter loaded or unloaded through one ingress is served or refused by
every ingress, and the engine replica unloads it (serve_app/lora_registry.py).
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray_harness import wait_for  # noqa: E402


@pytest.fixture(scope="module")
def service(two_ingress_service: dict) -> dict:
    """The session's service of two ingress replicas and one engine replica, LoRA on (tests/serve_app/conftest.py)."""
    return two_ingress_service


def _running_replicas(service: dict, deployment: str) -> int:
    status = serve.status().applications[service["app"]].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_two_ingress_replicas_answer_concurrent_requests_and_return_every_block(service) -> None:
    assert _running_replicas(service, "OpenAIIngress") == 2 and _running_replicas(service, "EngineReplica") == 1

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

    # 32 requests of 1 block each (prompt + 8 tokens <= 16) in flight together fit the cache.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert [status for status, _ in results] == [200] * 32
    assert [tokens for _, tokens in results] == [8] * 32

    handle = serve.get_deployment_handle("EngineReplica", service["app"])
    num_blocks = service["num_blocks"]
    infos: list[dict] = []

    def every_block_free() -> bool:
        infos.append(handle.health.remote().result())
        return infos[-1]["num_free_blocks"] == infos[-1]["num_total_blocks"] == num_blocks

    wait_for(every_block_free, 10, lambda: f"all {num_blocks} blocks back; last health: {infos[-1:]}")


def test_a_lora_adapter_loaded_or_unloaded_through_one_ingress_holds_for_every_replica(service, tmp_path) -> None:
    """The load route answers once both ingress replicas serve the adapter and the unload route once both
    refuse it and the engine replica has unloaded it: the registry saw every subscriber (two ingresses, one
    engine replica) at the change's version when the route answered. Requests through the HTTP proxy, which
    spreads them over both ingresses, all get the same answer."""
    base = service["base"]
    registry = serve.get_deployment_handle("LoraRegistry", service["app"])
    engine = serve.get_deployment_handle("EngineReplica", service["app"])

    def subscribers() -> dict[str, int]:
        return registry.subscribers.remote().result()

    def every_replica_saw_the_latest_version() -> bool:
        version = registry.view.remote().result().version
        return all(seen >= version for seen in subscribers().values())

    def statuses(model: str) -> list[int]:
        with httpx.Client(base_url=base, timeout=30) as client:
            return [client.post("/v1/completions", json={"model": model, "prompt": f"lora {i}", "max_tokens": 2})
                    .status_code for i in range(8)]

    wait_for(lambda: sorted(name.split(":")[0] for name in subscribers()) == ["engine", "ingress", "ingress"], 20,
             lambda: f"two ingresses and an engine replica following the registry: {subscribers()}")
    loaded = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "tiny-lora", "lora_path": str(tmp_path)},
                        timeout=30)
    assert loaded.status_code == 200, loaded.text
    assert every_replica_saw_the_latest_version(), subscribers()
    bad = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"}, timeout=30)
    assert bad.status_code == 400 and "not a folder" in bad.text
    assert set(registry.view.remote().result().adapters) == {"tiny-lora"}  # the bad one's name was given back
    assert statuses("tiny-lora") == [200] * 8
    body = {"prompt": "lora", "max_tokens": 4, "temperature": 0}
    texts = {model: httpx.post(f"{base}/v1/completions", json={**body, "model": model}, timeout=30).json()
             ["choices"][0]["text"] for model in ("tiny-lora", service["model"])}
    assert texts["tiny-lora"] != texts[service["model"]]  # the adapter reached the engine
    assert "tiny-lora" in {card["id"] for card in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]}

    unloaded = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "tiny-lora"}, timeout=30)
    assert unloaded.status_code == 200, unloaded.text
    assert every_replica_saw_the_latest_version(), subscribers()
    assert "tiny-lora" not in engine.model_info.remote().result().lora_names
    assert statuses("tiny-lora") == [404] * 8
