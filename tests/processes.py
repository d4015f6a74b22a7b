"""Waiting for processes the tests stop or kill, by the product's own liveness check
(engine/process/liveness.py: a zombie, exited but not reaped, counts as gone)."""

from __future__ import annotations

import time

from pagedserve.engine.process.liveness import process_running


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Whether process `pid` is gone within `timeout_s`, polled every 50 ms."""
    deadline = time.monotonic() + timeout_s
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
