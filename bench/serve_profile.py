"""Where a running service's processes spend their time while a load runs against it.

    python bench/serve_profile.py [--rate-hz 50] [--out DIR] -- SERVE_BENCH_ARGS...

For a service started on this machine with `serve run` (Ray's processes are found by their titles: the
HTTP proxy, every `OpenAIIngress` and `EngineReplica` replica, and each engine replica's engine core, the
spawned child), it runs `bench/serve_bench.py SERVE_BENCH_ARGS` and meanwhile:

- reads each process's CPU time (user + system, all threads, from /proc) before and after the run;
- records each with `py-spy record --nonblocking --threads --format raw` (busy samples only: a thread
  waiting in epoll or on a lock is not sampled), so a thread whose samples cover about the whole run was
  busy all along: one Python thread at 100% is a serial limit.

Prints serve_bench's table, then per process: CPU seconds and cores used over the run, its busiest
thread's share of the run, and the functions with the most samples of their own (self) and in total
(inclusive). The raw collapsed stacks stay in `--out` for flame graphs (`flamegraph.pl`, speedscope).
py-spy comes with `ray[default]`, or `pip install py-spy`; it needs permission to read the processes'
memory (the same user, and ptrace allowed).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROLES = (  # (role, pattern on the process's command line), first match wins
    ("proxy", re.compile(r"^ray::ProxyActor")),
    ("ingress", re.compile(r"^ray::ServeReplica:[^:]+:OpenAIIngress")),
    ("engine_replica", re.compile(r"^ray::ServeReplica:[^:]+:EngineReplica")),
    ("controller", re.compile(r"^ray::ServeController")),
)
SPAWNED_CHILD = re.compile(r"multiprocessing\.spawn import spawn_main")  # not the resource tracker
ROLE_ORDER = [role for role, _ in ROLES] + ["engine_core"]


@dataclass
class Process:
    pid: int
    role: str
    cpu_before_s: float = 0.0
    cpu_after_s: float = 0.0
    profile: Path | None = None
    recorder: subprocess.Popen | None = None


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after "pid (comm) ": state, ppid, ... (comm may hold spaces and parentheses); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def parent_pid(pid: int) -> int:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else -1


def cpu_seconds(pid: int) -> float:
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else float("nan")  # utime + stime


def find_processes() -> list[Process]:
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    found: list[Process] = []
    for pid in pids:
        cmd = command_line(pid)
        for role, pattern in ROLES:
            if pattern.search(cmd):
                found.append(Process(pid, role))
                break
    replicas = {p.pid for p in found if p.role == "engine_replica"}
    for pid in pids:
        if parent_pid(pid) in replicas and SPAWNED_CHILD.search(command_line(pid)):
            found.append(Process(pid, "engine_core"))
    return sorted(found, key=lambda p: ROLE_ORDER.index(p.role))


def parse_raw(path: Path) -> tuple[dict[str, int], collections.Counter, collections.Counter]:
    """py-spy's raw format: one `frame;frame;...;leaf count` line per distinct stack, the thread first with
    --threads. Returns busy samples per thread, self samples per function, inclusive samples per function."""
    threads: dict[str, int] = collections.Counter()
    self_counts: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    if not path.exists():
        return threads, self_counts, inclusive
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        threads[frames[0]] += n
        functions = [re.sub(r":\d+\)$", ")", frame) for frame in frames[1:]]  # line numbers off
        if functions:
            self_counts[functions[-1]] += n
        for function in set(functions):
            inclusive[function] += n
    return threads, self_counts, inclusive


def default_py_spy() -> str:
    """py-spy on PATH, else the one installed beside this interpreter: `.venv/bin/python bench/serve_profile.py`
    with the venv not activated has no py-spy on PATH, though ray[default] put it in .venv/bin."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else "py-spy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate-hz", type=int, default=50, help="py-spy samples per second per process")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")) / "profile")
    parser.add_argument("--top", type=int, default=12, help="functions listed per process")
    parser.add_argument("--py-spy", default=default_py_spy())
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then serve_bench.py's arguments")
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args

    processes = find_processes()
    if not processes:
        print("no Ray Serve processes found on this machine (is `serve run` up?)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for index, process in enumerate(processes):
        process.profile = args.out / f"{process.role}{index}_{process.pid}.txt"
        with open(process.profile.with_suffix(".err"), "w") as errors:  # the child keeps its own descriptor
            process.recorder = subprocess.Popen(
                [args.py_spy, "record", "--pid", str(process.pid), "--rate", str(args.rate_hz), "--nonblocking",
                 "--threads", "--format", "raw", "--output", str(process.profile)],
                stdout=subprocess.DEVNULL, stderr=errors,
            )
    time.sleep(1.0)  # py-spy attaches
    for process in processes:
        process.cpu_before_s = cpu_seconds(process.pid)
    started = time.monotonic()
    bench = subprocess.run([sys.executable, str(BENCH_DIR / "serve_bench.py"), *bench_args])
    wall = time.monotonic() - started
    for process in processes:
        process.cpu_after_s = cpu_seconds(process.pid)
    for process in processes:
        process.recorder.send_signal(subprocess.signal.SIGINT)  # py-spy writes its file on Ctrl-C
    for process in processes:
        try:
            process.recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.recorder.kill()

    # Samples span from py-spy's start to its stop: about the run plus ~1 s before and the stop after.
    print(f"\n### Processes over the run ({wall:.1f} s; py-spy at {args.rate_hz} Hz, busy samples only)\n")
    print("| process | pid | CPU s | cores | busiest thread: share of the run |")
    print("|---|---:|---:|---:|---|")
    details = []
    for process in processes:
        threads, self_counts, inclusive = parse_raw(process.profile)
        cpu = process.cpu_after_s - process.cpu_before_s
        busiest = max(threads.items(), key=lambda item: item[1], default=("-", 0))
        share = busiest[1] / (args.rate_hz * wall) if wall > 0 else 0.0
        print(f"| {process.role} | {process.pid} | {cpu:.1f} | {cpu / wall:.2f} | {busiest[0]}: {share:.0%} |")
        details.append((process, sum(threads.values()), self_counts, inclusive))
    for process, total, self_counts, inclusive in details:
        if not total:
            continue
        print(f"\n#### {process.role} {process.pid}: {total} busy samples")
        print("self: " + "; ".join(f"{n / total:.0%} {name}" for name, n in self_counts.most_common(args.top)))
        print("inclusive: " + "; ".join(f"{n / total:.0%} {name}" for name, n in inclusive.most_common(args.top * 2)))
    return bench.returncode


if __name__ == "__main__":
    sys.exit(main())
