"""A bounded soak on loopback: clients that read their answers whole and clients that go away mid-stream
or before a response, mixed, against `FakeAsyncEngine` through Ray Serve and HTTP (the session's service of
two ingress replicas and one engine replica, tests/serve_app/conftest.py).

Every request the clients sent must end in a response or an error the client sees (nothing hangs), the
replica's count of requests by how they ended must equal the clients' (completed = finished by length,
left = aborted), no engine request is left holding blocks, and the ingress logs a disconnect as one line,
never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray_harness import wait_for  # noqa: E402

NUM_CLIENTS = 24
SOAK_S = 8.0
CLIENT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def service(two_ingress_service: dict) -> dict:
    return two_ingress_service


async def _one(client: httpx.AsyncClient, model: str, rng: random.Random) -> str:
    """One request; returns how it ended for the client: completed, left, or error <status>."""
    kind = rng.choice(["stream", "stream", "full", "stream_leave", "stream_leave_early", "full_leave"])
    leaving = kind.endswith("leave") or kind.endswith("leave_early")
    # A client that leaves asks for a slow answer (0.2 s a token) it cannot have had whole when it goes.
    prompt = f"{'SLOW ' if leaving else ''}Hello world {rng.randrange(100)}"
    body = {"model": model, "prompt": prompt, "max_tokens": rng.randrange(8, 40), "temperature": 0,
            "stream": kind.startswith("stream")}
    if kind == "full_leave":
        try:
            await client.post("/v1/completions", json=body, timeout=1.0)
        except httpx.TimeoutException:
            return "left"
        return "completed?"  # must not happen: the answer takes seconds
    if kind == "full":
        response = await client.post("/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
        if response.status_code != 200:
            return f"error {response.status_code}"
        return "completed" if response.json()["choices"][0]["finish_reason"] == "length" else "bad answer"
    leave_after = 0 if kind == "stream_leave_early" else rng.randrange(1, 4)
    async with client.stream("POST", "/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S) as response:
        if response.status_code != 200:
            return f"error {response.status_code}"
        num_chunks = 0
        async for line in response.aiter_lines():
            if leaving and num_chunks >= leave_after:
                return "left"  # closing the response drops the connection
            if line == "data: [DONE]":
                return "completed"
            if line.startswith("data: "):
                if "error" in json.loads(line[len("data: "):]):
                    return "error in stream"
                num_chunks += 1
    return "stream ended without [DONE]"


def _ingress_log_lines(app: str) -> dict[Path, list[str]]:
    """Each ingress replica's log lines. The logs of this session's cluster: /tmp/ray/session_latest names
    whichever cluster on this machine started last, another test run's as well."""
    serve_logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return {path: path.read_text(errors="replace").splitlines()
            for path in serve_logs.glob(f"replica_{app}_OpenAIIngress_*.log")}


def test_every_request_ends_and_the_replica_counts_what_the_clients_saw(service):
    base, model, app = service["base"], service["model"], service["app"]
    handle = serve.get_deployment_handle("EngineReplica", app)
    before = handle.serving_stats.remote().result()["finished_by_reason"]
    log_lengths_before = {path: len(lines) for path, lines in _ingress_log_lines(app).items()}

    async def client_loop(seed: int, deadline: float) -> list[str]:
        rng = random.Random(seed)
        outcomes = []
        async with httpx.AsyncClient(base_url=base) as client:
            while time.monotonic() < deadline:
                try:
                    outcomes.append(await asyncio.wait_for(_one(client, model, rng), CLIENT_TIMEOUT_S))
                except asyncio.TimeoutError:
                    outcomes.append("no answer")
        return outcomes

    async def soak() -> list[str]:
        deadline = time.monotonic() + SOAK_S
        return sum(await asyncio.gather(*(client_loop(seed, deadline) for seed in range(NUM_CLIENTS))), [])

    outcomes = asyncio.run(soak())
    sent = len(outcomes)
    completed, left = outcomes.count("completed"), outcomes.count("left")
    assert completed + left == sent, sorted(set(outcomes))
    assert completed > 20 and left > 20, (completed, left)

    def replica_saw_all() -> dict[str, int] | None:
        after = handle.serving_stats.remote().result()["finished_by_reason"]
        seen = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
        return seen if sum(seen.values()) >= sent else None

    # Aborts land when the replica notices the cancellation: give it a moment.
    seen = wait_for(replica_saw_all, 30, lambda: (
        f"the replica to count every request: {sent} sent ({completed} completed, {left} left), the replica's "
        f"counts {handle.serving_stats.remote().result()['finished_by_reason']} (before: {before})"))
    assert seen.get("length", 0) == completed and seen.get("abort", 0) == left, (seen, completed, left)
    assert sum(seen.values()) == sent
    stats = handle.get_stats.remote().result()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks

    new_lines = [line for path, lines in _ingress_log_lines(app).items()
                 for line in lines[log_lengths_before.get(path, 0):]]
    assert not [line for line in new_lines if "Traceback" in line or "never retrieved" in line], \
        "\n".join(new_lines)[-3000:]
    assert sum("the client went away" in line for line in new_lines) == left
