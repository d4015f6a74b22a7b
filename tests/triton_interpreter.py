"""Running Triton kernels on CPU: a test module's worker, run once in a subprocess under TRITON_INTERPRET=1.

The interpreter is chosen when a kernel is defined (at import), so it must not leak into, or depend on,
the rest of the test session. A test module defines a worker that prints its results as one JSON line
when run as `python <module> --interpreter-worker`, and a module-scoped fixture named
`interpreter_results` that returns `interpreter_results(__file__)`.

The workers are separate processes, so the session starts them early (tests/conftest.py calls
`start_in_background` once collection is done): one after another on a thread of their own, in the order
their modules run, so a module's results are usually ready when its tests begin and the workers' CPU time
overlaps the rest of the suite instead of adding to it. They run in the idle scheduling class
(tests/idle_class.py), on CPU time the tests leave, until a module waits for one: from then on the running
worker and those after it run as normal processes, and only from then on does a worker's timeout count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

import idle_class

WORKER_FLAG = "--interpreter-worker"


_started: dict[str, Future] = {}
_running: list[subprocess.Popen] = []
_executor: ThreadPoolExecutor | None = None
_waited_for = threading.Event()  # a module waits for a worker: workers run as normal processes from now on


def _run_worker(test_file: str, timeout_s: float, in_background: bool = False) -> tuple[int, str, str]:
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # the worker imports this module too
    python_path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=python_path)
    is_idle = in_background and not _waited_for.is_set()
    command = idle_class.idle_command(test_file, WORKER_FLAG) if is_idle else [sys.executable, test_file, WORKER_FLAG]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _running.append(process)
    if is_idle and _waited_for.is_set():  # waited for between the check and the append
        idle_class.give_back_priority(process.pid)
    deadline = None if is_idle else time.monotonic() + timeout_s
    try:
        while True:
            if deadline is None and _waited_for.is_set():
                deadline = time.monotonic() + timeout_s
            try:
                stdout, stderr = process.communicate(timeout=1.0 if deadline is None else deadline - time.monotonic())
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    process.kill()
                    stdout, stderr = process.communicate()
                    stderr += f"\n(killed after {timeout_s:g} s)"
                    break
    finally:
        _running.remove(process)
    return process.returncode, stdout, stderr


def start_in_background(test_files: list[str], timeout_s: float = 300) -> None:
    """Run these modules' workers one at a time on a background thread, in this order."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton-interpreter")
    for test_file in test_files:
        key = os.path.abspath(test_file)
        if key not in _started:
            _started[key] = _executor.submit(_run_worker, key, timeout_s, True)


def after_workers(task: Callable[[], None]) -> None:
    """Run `task` on the workers' thread once the workers started so far have ended; at once where none were."""
    if _executor is None:
        task()
    else:
        _executor.submit(task)


def stop_background() -> None:
    """End of session: drop workers not started, kill the one running (an interrupted session)."""
    if _executor is not None:
        _executor.shutdown(wait=False, cancel_futures=True)
    for process in list(_running):
        process.kill()


def interpreter_results(test_file: str, timeout_s: float = 300) -> dict:
    """Run `test_file --interpreter-worker` with TRITON_INTERPRET=1 on CPU (or take the run started in the
    background for it); its last stdout line, parsed."""
    started = _started.pop(os.path.abspath(test_file), None)
    if started is not None and not started.done() and not _waited_for.is_set():
        _waited_for.set()
        for process in list(_running):
            idle_class.give_back_priority(process.pid)
    returncode, stdout, stderr = started.result() if started is not None else _run_worker(test_file, timeout_s)
    if returncode != 0:
        pytest.fail(f"interpreter worker failed:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])
