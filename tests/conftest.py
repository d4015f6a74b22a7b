"""Shared fixtures. The tiny models themselves are built in tiny_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import triton_interpreter
from tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Callable: arch name -> folder of a saved tiny random model of that architecture."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the Triton interpreter workers of the collected kernel modules in the background, in the
    order their tests run (tests/triton_interpreter.py)."""
    files: list[str] = []
    for item in session.items:
        if "interpreter_results" in getattr(item, "fixturenames", ()) and str(item.path) not in files:
            files.append(str(item.path))
    if files and not session.config.option.collectonly:
        triton_interpreter.start_in_background(files)


def pytest_sessionfinish(session: pytest.Session) -> None:
    triton_interpreter.stop_background()
