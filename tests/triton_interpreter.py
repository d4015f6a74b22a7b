"""Running Triton kernels on CPU: a test module's worker, run once in a subprocess under TRITON_INTERPRET=1.

The interpreter is chosen when a kernel is defined (at import), so it must not leak into, or depend on,
the rest of the test session. A test module defines a worker that prints its results as one JSON line
when run as `python <module> --interpreter-worker`, and a module-scoped fixture that returns
`interpreter_results(__file__)`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKER_FLAG = "--interpreter-worker"


def interpreter_results(test_file: str, timeout_s: float = 300) -> dict:
    """Run `test_file --interpreter-worker` with TRITON_INTERPRET=1 on CPU; its last stdout line, parsed."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # the worker imports this module too
    python_path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=python_path)
    completed = subprocess.run(
        [sys.executable, test_file, WORKER_FLAG], env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if completed.returncode != 0:
        pytest.fail(f"interpreter worker failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
