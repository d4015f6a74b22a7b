"""Fixtures shared by the benchmarks' tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench_scripts import bench_script


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory) -> Path:
    """bench/train_text_model.py's tiny preset after 24 steps on the CPU, on 30 of Python's own files: a folder
    with a model that has learnt a little, its tokenizer, training.json and heldout.jsonl. One thread: a shared
    2-core machine makes two threads spin against other load (0.5 s a tiny step instead of 10 ms)."""
    model_dir = tmp_path_factory.mktemp("tiny-text") / "tiny"
    script = bench_script("train_text_model")
    train_text_model = next(script)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_text_model.main(["--preset", "tiny", "--steps", "24", "--max-files", "30",
                                      "--out-dir", str(model_dir), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
        script.close()
    return model_dir


@pytest.fixture()
def one_thread():
    """Torch on one thread for the test: a shared 2-core machine makes two threads spin against other load (0.5 s
    a tiny step instead of 10 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
