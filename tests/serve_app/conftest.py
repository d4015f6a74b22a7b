"""Fixtures of the serve tests: one Ray cluster for the session, a tiny random Llama with a trained
byte-level BPE tokenizer (tests/tiny_models.py), and free ports.

The model is built once per session in a temp folder (a second on CPU); random weights are enough because
the tests compare the service with the offline engine token for token, not with good text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_harness import RayCluster, _free_port, local_cluster
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
    (ray_harness.deployed). Started by the first test that asks for it, shut down at the end."""
    with local_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def free_port():
    """A function returning a port nobody listens on now (bound and released on 127.0.0.1)."""
    return _free_port
