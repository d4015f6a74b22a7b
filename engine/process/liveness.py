"""Whether a process still runs, asked from outside it: the server's watch over an engine core's tensor-parallel
workers (engine/process/client.py), and benchmarks that watch a service's processes."""

from __future__ import annotations

import os


def process_running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited. A child of another process that exited stays a zombie
    until its parent reaps it (a core blocked in a collective never reaps its workers): on Linux its state in
    /proc says so; elsewhere existence is all there is to ask."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ...": the command may hold spaces and parentheses; the state follows the last ")".
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask whether the process exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
