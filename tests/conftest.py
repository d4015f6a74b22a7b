"""Shared fixtures. The tiny models themselves are built in tiny_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest

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
