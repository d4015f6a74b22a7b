"""Loading a bench/ script as a module for its tests (bench/ is not a package; its scripts run by path)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def bench_script(name: str) -> Iterator[ModuleType]:
    """`bench/<name>.py` as module `bench_<name>`, for a fixture to `yield from`: registered in sys.modules
    while in use (its dataclasses look their module up there), removed after."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
