"""A tiny random Llama with a byte-level BPE tokenizer (any bytes can be produced: structured outputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-bpe-llama"), tokenizer="byte-bpe",
                            num_hidden_layers=2)
