"""Fixtures of the serve tests: one Ray cluster for the session, a tiny random Llama with a trained
byte-level BPE tokenizer (tests/tiny_models.py), free ports, and one `FakeAsyncEngine` service that
several modules share (`two_ingress_service`).

The model is built once per session in a temp folder (a second on CPU); random weights are enough because
the tests compare the service with the offline engine token for token, not with good text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_harness import RayCluster, _free_port, fake_engine_app, local_cluster
from tiny_models import build_tiny_model

# fake_engine.py sits beside this file: the Ray workers import it through PYTHONPATH, the tests here directly.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer="byte-bpe",
                                num_hidden_layers=2))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """The session's Ray cluster with Serve started; each module runs its own application on it
    (ray_harness.deployed), or uses the one it shares with others (`two_ingress_service`). Started by the
    first test that asks for it, shut down at the end."""
    with local_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def free_port():
    """A function returning a port nobody listens on now (bound and released on 127.0.0.1)."""
    return _free_port


@pytest.fixture(scope="session")
def two_ingress_service(ray_cluster: RayCluster, tiny_model_path: str) -> Iterator[dict]:
    """Two ingress replicas in front of one `FakeAsyncEngine` replica with room for hundreds of requests at
    once, LoRA on (so a `LoraRegistry` too): the service of the modules that need no more than that (several
    ingresses, many streams, clients that leave, adapters loaded through one ingress). Deploying an
    application takes seconds, so it is deployed once, by the first module that asks, and stays up for the
    session; such a module holds its checks to what changed while it ran (counters before and after, log
    lines past their length before), never to totals, and leaves nothing behind (adapters it loads it
    unloads). Yields the base URL, the model, the application's name and the engine replica's KV blocks."""
    app_name, num_blocks = "ingress2", 4096
    args = {"model": tiny_model_path, "max_model_len": 512, "block_size": 16, "num_blocks": num_blocks,
            "num_cpus_per_replica": 1, "max_ongoing_requests": 512, "ingress_num_replicas": 2,
            "router": {"stats_period_s": 0.5, "max_queued_requests": 64}, "enable_lora": True}
    with fake_engine_app(ray_cluster, app_name, args) as base:
        yield {"base": base, "model": tiny_model_path, "app": app_name, "num_blocks": num_blocks}
