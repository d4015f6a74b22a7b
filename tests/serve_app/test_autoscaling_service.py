"""Autoscaling on the engines' own signals and graceful drain, through Ray Serve with `FakeAsyncEngine`
replicas: a load step takes the engine deployment from one replica to three, streams stay open while it
shrinks again, and it is back at one when idle; no stream fails or loses a token on the way.

Everything is short so one cycle fits in seconds: signals pushed every 0.2 s and averaged over 1 s, scale-up
after 0.5 s of pressure, scale-down after 1 s of less, a 3 s drain. Each replica's KV cache holds 8
blocks, so four streams fill one replica and the rest of a load step waits in the ingress's queue, which
is what the policy (serve_app/autoscaling.py) scales on besides the KV share.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray_harness import fake_engine_app, wait_for  # noqa: E402

APP = "autoscale"
LOAD_TOKENS = 5  # "SLOW": 0.2 s a token, so a load stream holds its 2 blocks for 1 s
LOAD_SEED, DRAIN_SEED = 1, 2
DRAIN_TOKENS = 30  # streams open across the scale-down: 6 s, longer than the 3 s drain


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model_path: str):
    args = {
        "model": tiny_model_path, "max_model_len": 256, "block_size": 16, "num_blocks": 8,
        "num_cpus_per_replica": 1, "drain_timeout_s": 3.0,
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "policy": "engine_load", "target_ongoing_requests": 4,
                        "target_kv_cache_usage": 0.75, "max_waiting_per_replica": 1, "upscale_delay_s": 0.5,
                        "downscale_delay_s": 1.0, "look_back_period_s": 1.0, "metrics_interval_s": 0.2},
        "router": {"stats_period_s": 0.2, "max_queued_requests": 64, "queue_timeout_s": 60},
    }
    with fake_engine_app(ray_cluster, APP, args) as base:
        yield {"base": base, "model": tiny_model_path}


def _running_replicas() -> int:
    status = serve.status().applications[APP].deployments["EngineReplica"]
    return status.replica_states.get("RUNNING", 0)


def _stream(base: str, model: str, prompt: str, max_tokens: int, seed: int) -> tuple[int, str, list[str]]:
    """(status, text, error events) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True}
    with httpx.Client(base_url=base, timeout=120) as client, client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, response.text, []
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    errors = [e for e in events if '"error"' in e] + ([] if events[-1:] == ["[DONE]"] else ["no [DONE]"])
    text = "".join(c["text"] for e in events if e != "[DONE]" and '"error"' not in e for c in json.loads(e)["choices"])
    return 200, text, errors


def test_load_scales_one_to_three_and_back_while_every_stream_gets_its_whole_answer(service) -> None:
    base, model = service["base"], service["model"]
    assert _running_replicas() == 1
    details = serve.context._get_global_client().get_serve_details()
    policy = details["applications"][APP]["deployments"]["EngineReplica"]["deployment_config"]["autoscaling_config"]
    assert policy["policy"]["policy_function"] == "pagedserve.serve_app.autoscaling:EngineLoadPolicy"
    results: list[tuple[int, int, int, str, list[str]]] = []  # (max_tokens, seed, status, text, errors)
    stop_load = threading.Event()
    peak = [1]

    def load_loop(worker: int) -> None:
        round_ = 0
        while not stop_load.is_set():
            results.append((LOAD_TOKENS, LOAD_SEED,
                            *_stream(base, model, f"SLOW load {worker} {round_} end", LOAD_TOKENS, LOAD_SEED)))
            round_ += 1

    def drain_stream(index: int) -> None:
        results.append((DRAIN_TOKENS, DRAIN_SEED,
                        *_stream(base, model, f"SLOW drain {index} end", DRAIN_TOKENS, DRAIN_SEED)))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        # A load step: 12 streams at once, each starting another when it ends; one replica holds 4.
        loaders = [pool.submit(load_loop, worker) for worker in range(12)]

        def scaled_up() -> bool:
            peak[0] = max(peak[0], _running_replicas())
            return peak[0] >= 3

        wait_for(scaled_up, 30, lambda: f"3 running replicas under load (peak {peak[0]})", period_s=0.2)
        # The step ends; streams opened now stay open while the load signals fall and replicas go.
        stop_load.set()
        drains = [pool.submit(drain_stream, index) for index in range(4)]
        for future in loaders:
            future.result()
        fewest_while_draining = 3
        while not all(future.done() for future in drains):
            fewest_while_draining = min(fewest_while_draining, _running_replicas())
            time.sleep(0.2)
        wait_for(lambda: _running_replicas() == 1 and serve.status().applications[APP].deployments[
            "EngineReplica"].replica_states.get("STOPPING", 0) == 0, 30,
            lambda: f"back to 1 replica when idle ({serve.status().applications[APP].deployments['EngineReplica']})")

    failed = [(status, text, errors) for _, _, status, text, errors in results if status != 200 or errors]
    assert not failed, failed
    # The fake engine's tokens depend on the prompt's last token and the seed only, and every prompt here
    # ends in "end": a FAST run with the same seed and length gives the text an unbroken run gives.
    references = {max_tokens: _stream(base, model, "FAST reference end", max_tokens, seed)
                  for max_tokens, seed in ((LOAD_TOKENS, LOAD_SEED), (DRAIN_TOKENS, DRAIN_SEED))}
    assert all(status == 200 and not errors for status, _, errors in references.values()), references
    truncated = [(max_tokens, text) for max_tokens, _, _, text, _ in results if text != references[max_tokens][1]]
    assert not truncated, truncated
    assert len(results) >= 16 and fewest_while_draining < 3
