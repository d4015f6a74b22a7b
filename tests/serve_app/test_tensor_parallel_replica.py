"""A replica with tp_size 2 (gloo on CPU): it answers over HTTP like TP=1, and routes as one replica."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from pagedserve.engine.llm import LLM  # noqa: E402
from pagedserve.engine.core.request import SamplingParams  # noqa: E402
from pagedserve.serve_app import build_app  # noqa: E402
from ray import serve  # noqa: E402
from ray_harness import deployed  # noqa: E402

ENGINE_ARGS = {"num_blocks": 64, "block_size": 16, "max_model_len": 256, "max_num_seqs": 16, "dtype": "float32"}
PROMPTS = ["The quick brown fox", "Paged attention stores keys"]


@pytest.fixture(scope="module")
def tp_service(ray_cluster, tiny_model_path: str):
    args = {"model": tiny_model_path, "num_replicas": 1, "tp_size": 2, **ENGINE_ARGS, "router": {"stats_period_s": 0.5}}
    with deployed(ray_cluster, "tp", build_app(args), timeout_s=240) as base:
        yield base


def test_tp2_replica_answers_like_tp1_and_counts_as_one_replica(tp_service, tiny_model_path):
    offline = LLM(tiny_model_path, **ENGINE_ARGS)
    expected = offline.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    for prompt, want in zip(PROMPTS, expected):
        response = httpx.post(f"{tp_service}/v1/completions", timeout=120, json={
            "model": tiny_model_path, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == want.outputs[0].text
    deployments = serve.status().applications["tp"].deployments
    replica_counts = {name: sum(d.replica_states.values()) for name, d in deployments.items()}
    engine_counts = [count for name, count in replica_counts.items() if "Replica" in name or "Engine" in name]
    assert engine_counts == [1], replica_counts
