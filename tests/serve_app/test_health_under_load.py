"""`/health` while every engine replica is at `max_ongoing_requests`: answered at once, not queued behind
the generation requests (a readiness probe that waits fails, and Kubernetes would take a busy pod out of
its Service). A service whose replica takes two requests at a time, kept full by two slow streams."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from ray_harness import fake_engine_app  # noqa: E402


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model_path: str):
    args = {
        "model": tiny_model_path, "max_model_len": 512,
        "block_size": 16, "num_blocks": 256, "num_cpus_per_replica": 1, "max_ongoing_requests": 2,
        "router": {"stats_period_s": 0.5},
    }
    with fake_engine_app(ray_cluster, "busy", args) as base:
        yield {"base": base, "model": tiny_model_path}


def test_health_answers_while_the_replica_is_full(service) -> None:
    # Two SLOW streams (0.2 s a token, 60 tokens: 12 s each) fill the replica's two slots; each is closed
    # once /health has answered (a client disconnect), so the test does not wait out the 12 s.
    first_tokens = threading.Barrier(3, timeout=60)
    health_answered = threading.Event()
    statuses: list[int] = []

    def slow_stream() -> None:
        body = {"model": service["model"], "prompt": "SLOW", "max_tokens": 60, "stream": True}
        with httpx.Client(base_url=service["base"], timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                statuses.append(response.status_code)
                lines = response.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                first_tokens.wait()
                health_answered.wait(60)  # then disconnect

    threads = [threading.Thread(target=slow_stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    first_tokens.wait()  # both streams are running
    started = time.monotonic()
    try:
        response = httpx.get(f"{service['base']}/health", timeout=30)
        waited = time.monotonic() - started
    finally:
        health_answered.set()
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert waited < 3.0, f"/health waited {waited:.1f} s behind the generation requests"
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200, 200]
