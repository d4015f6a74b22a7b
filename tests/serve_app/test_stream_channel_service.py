"""The stream channel through Ray Serve and HTTP: 200 streams at once over two ingress replicas and one
`FakeAsyncEngine` replica (its requests advance together on a step clock, so the steps are counted).

Every stream's text must equal the engine's output, and the messages the replica sent to the ingresses
must stay within steps x ingresses: one Ray message per token per stream would be 200 x MAX_TOKENS.
That service's channels are sockets (the default); the Ray channel calls that an ingress falls back to get an
application of their own (two engine replicas, one of which dies under a stream).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray_harness import fake_engine_app, wait_for  # noqa: E402

NUM_STREAMS = 200
MAX_TOKENS = 24
INGRESSES = 2


@pytest.fixture(scope="module")
def service(two_ingress_service: dict) -> dict:
    """The session's service of two ingress replicas and one engine replica that takes 512 requests at once
    (tests/serve_app/conftest.py)."""
    return two_ingress_service


async def _stream(client: httpx.AsyncClient, model: str, prompt: str, **fields: object) -> str | list[str]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, **fields}
    n = int(fields.get("n", 1))
    texts = [""] * n
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    texts[choice["index"]] += choice["text"]
    return texts[0] if n == 1 else texts


def test_200_streams_get_their_text_in_messages_that_follow_steps_not_streams(service):
    base, model = service["base"], service["model"]
    handle = serve.get_deployment_handle("EngineReplica", service["app"])
    prompts = [f"Hello world {i % 7}" for i in range(NUM_STREAMS)]

    limits = httpx.Limits(max_connections=NUM_STREAMS, max_keepalive_connections=NUM_STREAMS)

    async def answers() -> dict[str, str]:  # one answer per distinct prompt, not streamed
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            expected = {}
            for prompt in set(prompts):
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
                expected[prompt] = response.json()["choices"][0]["text"]
            return expected

    async def streams() -> list[str]:
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_stream(client, model, p) for p in prompts))

    expected = asyncio.run(answers())
    before = handle.serving_stats.remote().result(), handle.get_stats.remote().result().num_steps_total
    texts = asyncio.run(streams())
    stats, steps = handle.serving_stats.remote().result(), handle.get_stats.remote().result().num_steps_total
    assert texts == [expected[p] for p in prompts]
    num_messages = stats["num_messages"] - before[0]["num_messages"]
    num_steps = steps - before[1]
    # One channel per ingress, not per stream (a replica ends one 0.5 s after that ingress's last request).
    assert stats["num_channels"] <= INGRESSES
    # At most one message per step and ingress (and one more per ingress for items from before its first
    # step); one message per token per stream would be NUM_STREAMS * MAX_TOKENS.
    assert num_messages <= INGRESSES * (num_steps + 1), (num_messages, num_steps)
    assert num_steps < NUM_STREAMS * MAX_TOKENS / 10


def test_streams_through_ray_channel_calls_complete_and_one_whose_replica_dies_goes_on(ray_cluster, tiny_model_path):
    """`stream_channel_transport: ray`, the fallback where the channel's socket cannot connect, through Serve:
    two engine replicas, streams on both, and one (n=2) whose replica's process ends after two tokens goes on on
    the other from the tokens sent. Every stream gets the text a healthy replica gives, and the channel calls end
    once idle (a replica that Serve removes waits for them)."""
    args = {"model": tiny_model_path, "max_model_len": 512, "block_size": 16, "num_blocks": 1024,
            "num_cpus_per_replica": 1, "num_replicas": 2, "router": {"stats_period_s": 0.5},
            "stream_channel_transport": "ray"}
    requests = [(f"Hello world {i}", 1) for i in range(8)] + [(f"DIEONCE {uuid.uuid4().hex[:8]} tell me", 2)]
    # Seeded: a completion that goes on elsewhere samples as its index did there (seed + index), which the fake
    # engine's tokens, made from the index, need.
    fields = {"model": tiny_model_path, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 3}

    async def streams(base: str) -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            texts = await asyncio.gather(*(_stream(client, tiny_model_path, prompt, n=n, seed=3)
                                           for prompt, n in requests))
            expected = []
            for prompt, n in requests:  # the marker exists now: no replica dies
                response = await client.post("/v1/completions", json={**fields, "prompt": prompt, "n": n})
                choices = [choice["text"] for choice in response.json()["choices"]]
                expected.append(choices[0] if n == 1 else choices)
            return texts, expected

    with fake_engine_app(ray_cluster, "raychannel", args) as base:
        texts, expected = asyncio.run(streams(base))
        handle = serve.get_deployment_handle("EngineReplica", "raychannel")
        # A few calls, routed to either replica: each says none of its channel calls is open.
        wait_for(lambda: all(handle.serving_stats.remote().result()["num_channels"] == 0 for _ in range(4)), 20,
                 "the engine replicas' channel calls to end once idle")
    assert texts == expected
