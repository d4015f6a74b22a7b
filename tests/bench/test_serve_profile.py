"""bench/serve_profile.py: which processes it finds for a running service, and how it reads py-spy's output."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from bench_scripts import bench_script


# A stand-in engine replica: a Python process titled as Ray titles the replica's worker, whose engine core
# is a child started with multiprocessing's spawn, as EngineCoreClient starts it.
REPLICA = """
import multiprocessing, sys, time
if __name__ == "__main__":
    multiprocessing.set_executable(sys.argv[1])  # argv[0] is the title: Python cannot tell its own path
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    child.start()
    print(child.pid, flush=True)
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def serve_profile():
    yield from bench_script("serve_profile")


def test_finds_the_titled_ray_processes_and_the_engine_core_child(serve_profile, tmp_path) -> None:
    script = tmp_path / "replica.py"
    script.write_text(REPLICA)
    replica = subprocess.Popen(["ray::ServeReplica:pagedserve:EngineReplica", str(script), sys.executable], executable=sys.executable,
                               stdout=subprocess.PIPE, text=True)
    proxy = subprocess.Popen(["ray::ProxyActor", "60"], executable="/bin/sleep")
    try:
        core_pid = int(replica.stdout.readline())
        wanted = {("engine_replica", replica.pid), ("engine_core", core_pid), ("proxy", proxy.pid)}
        deadline = time.monotonic() + 10  # until the fake proxy has exec'd under its title
        found = {(p.role, p.pid) for p in serve_profile.find_processes()}
        while not wanted <= found and time.monotonic() < deadline:
            time.sleep(0.05)
            found = {(p.role, p.pid) for p in serve_profile.find_processes()}
        assert ("engine_replica", replica.pid) in found
        assert ("engine_core", core_pid) in found
        assert ("proxy", proxy.pid) in found
        # multiprocessing's resource tracker is a child of the replica too, but not its engine core.
        assert [p for p in serve_profile.find_processes() if p.role == "engine_core"
                and serve_profile.parent_pid(p.pid) == replica.pid] == [
                    p for p in serve_profile.find_processes() if p.pid == core_pid]
        assert serve_profile.cpu_seconds(replica.pid) >= 0.0
    finally:
        for process in (replica, proxy):
            process.kill()
            process.wait()


def test_reads_busy_samples_per_thread_and_self_and_inclusive_counts(serve_profile, tmp_path) -> None:
    raw = tmp_path / "replica.txt"
    raw.write_text(
        "thread (11): MainThread;run (loop.py:10);step (engine.py:20);pack (wire.py:5) 30\n"
        "thread (11): MainThread;run (loop.py:10);step (engine.py:21) 10\n"
        "thread (12): reader;read (wire.py:40);pack (wire.py:6) 5\n"
        "thread (12): reader;recurse (r.py:1);recurse (r.py:2) 1\n"
    )
    threads, self_counts, inclusive = serve_profile.parse_raw(raw)
    assert threads == {"thread (11): MainThread": 40, "thread (12): reader": 6}
    # Line numbers are dropped: samples add up per function.
    assert self_counts["pack (wire.py)"] == 35 and self_counts["step (engine.py)"] == 10
    assert inclusive["step (engine.py)"] == 40 and inclusive["run (loop.py)"] == 40
    assert inclusive["recurse (r.py)"] == 1  # a function twice in one stack counts once
    assert serve_profile.parse_raw(tmp_path / "missing.txt") == ({}, {}, {})


def test_py_spy_is_found_beside_the_interpreter_when_the_venv_is_not_on_path(serve_profile, tmp_path,
                                                                               monkeypatch) -> None:
    """observability.md's `python bench/serve_profile.py`, run as `.venv/bin/python ...` without activating the
    venv, failed with FileNotFoundError 'py-spy': ray[default] installs it in .venv/bin, which is not on PATH."""
    interpreter = tmp_path / "bin" / "python"
    interpreter.parent.mkdir()
    interpreter.touch()
    monkeypatch.setattr(sys, "executable", str(interpreter))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert serve_profile.default_py_spy() == "py-spy"  # nothing beside it: the name, for a clear error
    (tmp_path / "bin" / "py-spy").touch()
    assert serve_profile.default_py_spy() == str(tmp_path / "bin" / "py-spy")
