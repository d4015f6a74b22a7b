"""Background processes of the test session in Linux's idle scheduling class (SCHED_IDLE).

The session starts work that its tests wait for later: the Triton interpreter workers
(tests/triton_interpreter.py) and the demo model's build (tests/demo_background.py). In the idle class such
a process runs only on CPU time that nothing else wants (not even the niced Ray workers), so it does not
slow the tests running meanwhile; torch's intra-op threads in the test process, which spin while they
wait for each other, lose most when another process of normal priority shares their cores. A test that
has to wait for one gives it the normal class back, so that other load cannot starve it meanwhile (an
unprivileged user may not; then it finishes on idle time, which the waiting test leaves it). Where there
is no idle class, commands run as given.
"""

from __future__ import annotations

import os
import sys

# `python script args...`, with the script's folder first on sys.path as Python puts it, in the idle class
# (as it is where a sandbox refuses the call).
_LAUNCHER = """
import os, runpy, sys
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except OSError:
    pass
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def idle_command(script: str, *args: str) -> list[str]:
    """The command that runs `script` as `__main__` with `args`, in the idle class where there is one."""
    if not hasattr(os, "SCHED_IDLE"):
        return [sys.executable, script, *args]
    return [sys.executable, "-c", _LAUNCHER, script, *args]


def give_back_priority(pid: int) -> None:
    """Every thread of `pid` in the normal class at this process's nice value, where the system lets us."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        thread_ids = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        thread_ids = [pid]
    for thread_id in thread_ids:
        try:
            os.sched_setscheduler(thread_id, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, thread_id, own_nice)
        except OSError:  # gone, or not ours to raise
            pass
