"""The demo model's test build, trained in a background process while the rest of the suite runs.

tests/demo trains a small demo recipe once, tens of seconds of one core. The session starts that build once
the Triton interpreter workers, which the kernel modules need early, are done (tests/conftest.py; at once
where there are none) and runs the modules that read the built model last, so the build takes CPU time the
rest of the suite leaves idle (the Ray tests spend much of theirs waiting for replicas) instead of adding
its own time to the suite. The child runs in the idle scheduling class
(tests/idle_class.py), so it takes nothing the tests and their replicas want; a test that finds it
unfinished gives it the normal class back and waits. Torch trains on one thread there: two threads on a busy
two-core machine spin against each other and train several times slower.

A module whose tests take the `built_cache` fixture names its recipe `RECIPE`; the fixture returns
`built_cache(RECIPE)`, a cache folder holding that build, made through `demo_model_path`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

import idle_class

FIXTURE = "built_cache"


class _Build:
    """One background build: its child process and the cache folder it builds into."""

    def __init__(self, recipe) -> None:
        self.cache_dir = Path(tempfile.mkdtemp(prefix="pagedserve-demo-test-"))
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        python_path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
        self.process = subprocess.Popen(
            idle_class.idle_command(os.path.abspath(__file__), str(self.cache_dir), json.dumps(asdict(recipe))),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self) -> Path:
        if self.process.poll() is None:
            idle_class.give_back_priority(self.process.pid)
        stdout, stderr = self.process.communicate()
        if self.process.returncode != 0:
            pytest.fail(f"demo model build failed ({self.process.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")
        return self.cache_dir

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        shutil.rmtree(self.cache_dir, ignore_errors=True)


_builds: dict = {}  # recipe -> _Build
_builds_lock = threading.Lock()  # the session may start a build from another thread (tests/conftest.py)
_stopped = threading.Event()


def start_in_background(recipe) -> None:
    """Start building `recipe` in a child process, unless it was started already or the session is over."""
    with _builds_lock:
        if recipe not in _builds and not _stopped.is_set():
            _builds[recipe] = _Build(recipe)


def built_cache(recipe) -> Path:
    """A cache folder holding the build of `recipe`: the background one (waited for) or one started now."""
    start_in_background(recipe)
    return _builds[recipe].wait()


def stop_background() -> None:
    """End of session: kill an unfinished build and remove the cache folders; start none after this."""
    with _builds_lock:
        _stopped.set()
        for build in _builds.values():
            build.stop()
        _builds.clear()


def _worker(cache_dir: str, recipe_json: str) -> None:
    import torch

    torch.set_num_threads(1)
    from pagedserve.demo.model import DemoRecipe, demo_model_path

    demo_model_path(Path(cache_dir), recipe=DemoRecipe(**json.loads(recipe_json)))


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
