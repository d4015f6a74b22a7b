"""Shared fixtures. The tiny models themselves are built in tiny_models.py."""

from __future__ import annotations

import logging
import os

# Read when ray is first imported: no Ray API call of this process starts a cluster by itself. Every test starts
# and ends its own (tests/ray_harness.py); without this, a Serve router thread left in the test process by a
# deployment handle called `ray.wait` after the last cluster ended and `ray.init()` began a new one as pytest
# exited (a head node nobody would stop).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import demo_background  # noqa: E402
import triton_interpreter  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Callable: arch name -> folder of a saved tiny random model of that architecture."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules that read the built demo model run last, so its background build has the whole suite
    to finish in (tests/demo_background.py); everything else keeps its order."""
    demo_files = {item.path for item in items if demo_background.FIXTURE in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: item.path in demo_files)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start in the background what collected tests will wait for: the Triton interpreter workers of the
    kernel modules, in the order their tests run (tests/triton_interpreter.py), then the demo model's
    build, which only the last modules read (tests/demo_background.py)."""
    if session.config.option.collectonly:
        return
    files: list[str] = []
    recipes = []
    for item in session.items:
        fixture_names = getattr(item, "fixturenames", ())
        if "interpreter_results" in fixture_names and str(item.path) not in files:
            files.append(str(item.path))
        if demo_background.FIXTURE in fixture_names and item.module.RECIPE not in recipes:
            recipes.append(item.module.RECIPE)
    if files:
        triton_interpreter.start_in_background(files)
    for recipe in recipes:
        triton_interpreter.after_workers(lambda recipe=recipe: demo_background.start_in_background(recipe))


def pytest_sessionfinish(session: pytest.Session) -> None:
    triton_interpreter.stop_background()
    demo_background.stop_background()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Serve's router threads outlive the last cluster (RAY_ENABLE_AUTO_CONNECT=0 above keeps them from starting a
    new one) and log their failed metrics push to a stream pytest has closed: a traceback after the summary."""
    logging.getLogger("ray.serve").disabled = True
