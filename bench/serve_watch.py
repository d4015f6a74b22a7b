"""Watch a pagedserve service on a Ray cluster while a load runs; optionally SIGKILL one engine replica.

    python bench/serve_watch.py wait --replicas 2 --timeout-s 300 --serve-pid 1234
    python bench/serve_watch.py watch --out run3.json --load-out run3.md --kill-replica-after 6 -- \\
        python bench/serve_bench.py --num-requests 512 --concurrency 512 --max-tokens 256
    python bench/serve_watch.py summary run2.json run3.json

`wait` returns once /v1/models answers and Serve lists `--replicas` engine replicas RUNNING (exit 1 on
timeout, or when the `serve run` process it is given has died).

`watch` takes a baseline sample, starts the load command (its stdout goes to `--load-out`), and every
`--interval-s` samples two things: Ray's metrics agent (`--metrics-url`, the node's Prometheus endpoint)
for each engine replica's `ray_vllm_kv_cache_usage_perc`, `ray_vllm_num_requests_running` and
`ray_vllm_request_success_total` by finished_reason (serve_app/metrics.py; the `replica` label is Serve's
replica id), and Serve's replica list with states and PIDs from the dashboard's REST API
(`/api/serve/applications/`). With `--kill-replica-after S` it sends SIGKILL to the engine replica with the
most running requests S seconds after the load started, and records when Serve saw the replica gone, when
the replacement was RUNNING (as many RUNNING as before the kill) and when the replacement first counted a
finished request. A replacement that comes up after the load has ended would never get one, so from then on
a few short probe requests are sent until it does. The watch ends `--tail-s` after the load (counters are
exported every second or so), and after the recovery with a kill (or `--recovery-timeout-s` past the kill);
`--max-s` bounds the whole run (the load is interrupted). Everything goes to one JSON file: samples, events,
per-replica finished-request counts during the run, and serve_bench's headline numbers.

`summary` prints the markdown summary of one or more watch files. Nothing here imports Ray: only HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.engine.process.liveness import process_running

KV_USAGE = "ray_vllm_kv_cache_usage_perc"
NUM_RUNNING = "ray_vllm_num_requests_running"
REQUEST_SUCCESS = "ray_vllm_request_success_total"
WATCHED_SERIES = (KV_USAGE, NUM_RUNNING, REQUEST_SUCCESS)
COMPLETED_REASONS = ("stop", "length")  # a request served to its end (abort and error are not)


# ---- Ray's metrics agent ------------------------------------------------------------------------------
@dataclass
class ReplicaMetrics:
    """One engine replica's series in one scrape."""

    kv_cache_usage: float | None = None  # 0..1
    num_running: float | None = None
    finished_by_reason: dict[str, float] = field(default_factory=dict)

    @property
    def num_completed(self) -> float:
        return sum(self.finished_by_reason.get(reason, 0.0) for reason in COMPLETED_REASONS)


def parse_replica_metrics(text: str) -> dict[str, ReplicaMetrics]:
    """Per `replica` label: KV usage, running requests and finished requests by reason, from a scrape.

    Only the sample lines of the watched series are handed to prometheus_client's parser: a scrape of a
    busy node carries every histogram bucket of every process, and the parser would read all of it. Without
    their `# TYPE` lines they parse as untyped families whose sample names are the exposed names. A series
    repeated for one replica (other labels differing) is summed for the counter; gauges keep the last value.
    """
    lines = [line for line in text.splitlines()
             if line.startswith(WATCHED_SERIES) and line.split("{", 1)[0].split(" ", 1)[0] in WATCHED_SERIES]
    replicas: dict[str, ReplicaMetrics] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            replica = sample.labels.get("replica")
            if replica is None:
                continue
            metrics = replicas.setdefault(replica, ReplicaMetrics())
            if sample.name == KV_USAGE:
                metrics.kv_cache_usage = sample.value
            elif sample.name == NUM_RUNNING:
                metrics.num_running = sample.value
            elif sample.name == REQUEST_SUCCESS:
                reason = sample.labels.get("finished_reason", "")
                metrics.finished_by_reason[reason] = metrics.finished_by_reason.get(reason, 0.0) + sample.value
    return replicas


# ---- Serve's replicas, from the dashboard ---------------------------------------------------------------
def parse_serve_replicas(details: dict[str, Any], app: str, deployment: str) -> dict[str, dict[str, Any]]:
    """replica id -> {"state", "pid"} of one deployment in the dashboard's `/api/serve/applications/` body."""
    deployments = details.get("applications", {}).get(app, {}).get("deployments", {})
    replicas = deployments.get(deployment, {}).get("replicas", [])
    return {r["replica_id"]: {"state": r.get("state"), "pid": r.get("pid")} for r in replicas}


def num_in_state(replicas: dict[str, dict[str, Any]], state: str = "RUNNING") -> int:
    return sum(1 for r in replicas.values() if r["state"] == state)


class ServiceProbe:
    """HTTP reads of one node: the metrics agent, Serve's details on the dashboard, the service itself."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client = httpx.Client(timeout=args.http_timeout_s)

    def replicas(self) -> dict[str, dict[str, Any]]:
        response = self.client.get(f"{self.args.dashboard_url}/api/serve/applications/")
        response.raise_for_status()
        return parse_serve_replicas(response.json(), self.args.app, self.args.deployment)

    def metrics(self) -> dict[str, ReplicaMetrics]:
        response = self.client.get(self.args.metrics_url)
        response.raise_for_status()
        return parse_replica_metrics(response.text)

    def model_id(self) -> str | None:
        response = self.client.get(f"{self.args.url}/v1/models", timeout=5.0)
        return response.json()["data"][0]["id"] if response.status_code == 200 else None

    def sample(self, t_s: float) -> dict[str, Any]:
        """One observation; a failed read is recorded in the sample, never raised (the service may be busy)."""
        sample: dict[str, Any] = {"t_s": round(t_s, 3)}
        try:
            sample["replicas"] = self.replicas()
        except (httpx.HTTPError, ValueError) as exc:
            sample["replicas_error"] = f"{type(exc).__name__}: {exc}"[:200]
        try:
            sample["metrics"] = {
                replica: {"kv": m.kv_cache_usage, "running": m.num_running, "finished": m.finished_by_reason}
                for replica, m in self.metrics().items()
            }
        except (httpx.HTTPError, ValueError) as exc:
            sample["metrics_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return sample


# ---- processes --------------------------------------------------------------------------------------------
def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (an engine replica's core process), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces, so split after its ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


class Prober:
    """A few short non-streamed completions in a loop, so a replica that came up after the load gets work."""

    def __init__(self, url: str, model: str, concurrency: int) -> None:
        self.url, self.model, self.concurrency = url, model, concurrency
        self.num_ok = self.num_failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(concurrency)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _loop(self) -> None:
        body = {"model": self.model, "prompt": "the model reads a prompt", "max_tokens": 8, "ignore_eos": True}
        with httpx.Client(base_url=self.url, timeout=60.0) as client:
            while not self._stop.is_set():
                try:
                    ok = client.post("/v1/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with self._lock:
                    if ok:
                        self.num_ok += 1
                    else:
                        self.num_failed += 1
                if not ok:
                    self._stop.wait(0.5)


# ---- serve_bench's table --------------------------------------------------------------------------------
def parse_bench_table(text: str) -> dict[str, Any]:
    """The headline rows of bench/serve_bench.py's markdown table (missing rows are left out)."""
    found: dict[str, Any] = {}
    patterns = {
        "output_tokens_per_s": (r"\| output tokens/s \| ([\d.]+) \|", float),
        "request_throughput_per_s": (r"\| request throughput \| ([\d.]+) req/s \|", float),
        "wall_s": (r"\| wall time \| ([\d.]+) s \|", float),
        "requests_ok": (r"\| requests ok / sent \| (\d+) / \d+ \|", int),
        "requests_sent": (r"\| requests ok / sent \| \d+ / (\d+) \|", int),
        "errors": (r"\| errors \| (.+) \|", str),
    }
    for key, (pattern, convert) in patterns.items():
        match = re.search(pattern, text)
        if match:
            found[key] = convert(match.group(1))
    if "requests_ok" in found and "requests_sent" in found:
        found["requests_failed"] = found["requests_sent"] - found["requests_ok"]
    return found


# ---- wait -------------------------------------------------------------------------------------------------
def wait_ready(args: argparse.Namespace) -> int:
    probe = ServiceProbe(args)
    started = time.monotonic()
    last_report_s = 0.0
    while True:
        elapsed_s = time.monotonic() - started
        try:
            has_model = probe.model_id() is not None
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            has_model = False
        replicas: dict[str, dict[str, Any]] = {}
        dashboard_error = ""
        try:
            replicas = probe.replicas()
        except (httpx.HTTPError, ValueError) as exc:  # the dashboard not up yet, or without Serve's API
            dashboard_error = f"; dashboard: {type(exc).__name__}: {exc}"[:160]
        state = (f"/v1/models {'answers' if has_model else 'does not answer'}, "
                 f"replicas {sorted(r['state'] for r in replicas.values())}{dashboard_error}")
        if has_model and num_in_state(replicas) >= args.replicas:
            print(f"service up after {elapsed_s:.0f} s: {state}", file=sys.stderr)
            return 0
        if args.serve_pid and not process_running(args.serve_pid):
            print(f"serve run (pid {args.serve_pid}) exited after {elapsed_s:.0f} s: {state}", file=sys.stderr)
            return 1
        if elapsed_s > args.timeout_s:
            print(f"not up after {args.timeout_s:.0f} s: {state}", file=sys.stderr)
            return 1
        if elapsed_s - last_report_s >= 15:
            print(f"  waiting, {elapsed_s:.0f} s: {state}", file=sys.stderr)
            last_report_s = elapsed_s
        time.sleep(1.0)


# ---- watch ------------------------------------------------------------------------------------------------
@dataclass
class KillRecord:
    """The kill and what followed it; times in seconds since the load started."""

    replica: str
    pid: int
    num_running_at_kill: float | None
    replicas_before: list[str]  # every replica Serve listed at the kill
    replicas_running_before: int
    core_pids: list[int]
    kill_s: float
    serve_saw_it_gone_s: float | None = None
    replacement: str | None = None
    replacement_listed_s: float | None = None
    replacement_running_s: float | None = None  # and as many RUNNING as before the kill
    replacement_first_finished_s: float | None = None
    core_processes_gone_s: float | None = None
    probes_started_s: float | None = None

    def since_kill(self) -> dict[str, float | None]:
        names = ("serve_saw_it_gone_s", "replacement_listed_s", "replacement_running_s",
                 "replacement_first_finished_s", "core_processes_gone_s")
        return {name: None if getattr(self, name) is None else round(getattr(self, name) - self.kill_s, 2)
                for name in names}

    @property
    def is_recovered(self) -> bool:
        return self.replacement_first_finished_s is not None


def pick_victim(sample: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The RUNNING replica with the most running requests (ties: the smallest id), with its Serve entry."""
    running = {rid: r for rid, r in sample.get("replicas", {}).items() if r["state"] == "RUNNING" and r.get("pid")}
    if not running:
        return None
    metrics = sample.get("metrics", {})
    chosen = min(running, key=lambda rid: (-(metrics.get(rid, {}).get("running") or 0.0), rid))
    return chosen, running[chosen]


def update_recovery(kill: KillRecord, sample: dict[str, Any]) -> None:
    t_s = sample["t_s"]
    replicas = sample.get("replicas")
    if replicas is not None:
        if kill.serve_saw_it_gone_s is None and replicas.get(kill.replica, {}).get("state") != "RUNNING":
            kill.serve_saw_it_gone_s = t_s
        if kill.replacement is None:
            new = sorted(rid for rid in replicas if rid not in kill.replicas_before)
            if new:
                kill.replacement, kill.replacement_listed_s = new[0], t_s
        if (kill.replacement is not None and kill.replacement_running_s is None
                and replicas.get(kill.replacement, {}).get("state") == "RUNNING"
                and num_in_state(replicas) >= kill.replicas_running_before):
            kill.replacement_running_s = t_s
    if kill.replacement is not None and kill.replacement_first_finished_s is None:
        finished = sample.get("metrics", {}).get(kill.replacement, {}).get("finished", {})
        if sum(finished.get(reason, 0.0) for reason in COMPLETED_REASONS) > 0:
            kill.replacement_first_finished_s = t_s
    if kill.core_pids and kill.core_processes_gone_s is None and not any(process_running(pid) for pid in kill.core_pids):
        kill.core_processes_gone_s = t_s


def finished_during(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per replica and reason: requests finished between the baseline and the last sample that lists it.

    The baseline is the first sample with metrics; a replica missing from it started during the run and
    counts from 0.
    """
    first: dict[str, dict[str, float]] = {}
    last: dict[str, dict[str, float]] = {}
    scrapes = [sample["metrics"] for sample in samples if "metrics" in sample]
    for index, metrics_by_replica in enumerate(scrapes):
        for replica, metrics in metrics_by_replica.items():
            first.setdefault(replica, metrics["finished"] if index == 0 else {})
            last[replica] = metrics["finished"]
    return {replica: {reason: round(value - first[replica].get(reason, 0.0), 1)
                      for reason, value in last[replica].items() if value - first[replica].get(reason, 0.0) > 0}
            for replica in last}


def watch(args: argparse.Namespace) -> int:
    probe = ServiceProbe(args)
    samples: list[dict[str, Any]] = [probe.sample(0.0)]  # baseline: the counters before the load
    started, started_unix_s = time.monotonic(), time.time()
    load_out = open(args.load_out, "w") if args.load_out else subprocess.DEVNULL
    load = subprocess.Popen(args.command, stdout=load_out)
    load_ended_s: float | None = None
    kill: KillRecord | None = None
    prober: Prober | None = None
    notes: list[str] = []
    interrupted = False
    next_report_s = 0.0
    try:
        while True:
            t_s = time.monotonic() - started
            sample = probe.sample(t_s)
            samples.append(sample)
            if load_ended_s is None and load.poll() is not None:
                load_ended_s = t_s
            if kill is not None:
                update_recovery(kill, sample)
            elif args.kill_replica_after is not None and t_s >= args.kill_replica_after:
                kill = kill_replica(sample, started, notes)
                if kill is None:
                    args.kill_replica_after = None  # nothing to kill: say so once and watch on
            if kill is not None:
                if (prober is None and load_ended_s is not None and kill.replacement_running_s is not None
                        and not kill.is_recovered):
                    try:
                        model = probe.model_id()
                    except (httpx.HTTPError, ValueError, KeyError, IndexError):
                        model = None
                    if model is not None:
                        prober = Prober(args.url, model, args.probe_concurrency)
                        prober.start()
                        kill.probes_started_s = t_s
                if prober is not None and kill.is_recovered:
                    prober.stop()
            if t_s >= next_report_s:
                print(f"  {progress_line(sample)}", file=sys.stderr)
                next_report_s += args.report_every_s
            load_done = load_ended_s is not None and t_s >= load_ended_s + args.tail_s
            if kill is None:  # a kill still to come (even after the load: its recovery is measured with probes)
                recovery_done = args.kill_replica_after is None
            else:
                recovery_done = kill.is_recovered or t_s >= kill.kill_s + args.recovery_timeout_s
            if load_done and recovery_done:
                break
            if t_s >= args.max_s:
                interrupted = True
                notes.append(f"stopped at --max-s {args.max_s:.0f} s")
                break
            time.sleep(max(0.0, args.interval_s - (time.monotonic() - started - t_s)))
    finally:
        if load.poll() is None:
            load.send_signal(signal.SIGINT)
            try:
                load.wait(timeout=10)
            except subprocess.TimeoutExpired:
                load.kill()
            notes.append("the load was interrupted")
        if prober is not None:
            prober.stop()
        if args.load_out:
            load_out.close()  # type: ignore[union-attr]
    if kill is not None and not kill.is_recovered:
        notes.append(f"the replacement had no finished request {samples[-1]['t_s'] - kill.kill_s:.0f} s after the kill")
    result = {
        "name": args.name or Path(args.out).stem,
        "started_unix_s": round(started_unix_s, 3),  # t_s = 0, to match the service's log times
        "command": args.command,
        "load_exit_code": load.returncode,
        "load_ended_s": load_ended_s,
        "load": parse_bench_table(Path(args.load_out).read_text()) if args.load_out else {},
        "interval_s": args.interval_s,
        "finished_by_replica": finished_during(samples),
        "kill": None if kill is None else {**asdict(kill), "since_kill_s": kill.since_kill()},
        "probes": None if prober is None else {"ok": prober.num_ok, "failed": prober.num_failed},
        "notes": notes,
        "samples": samples,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"watch: {len(samples)} samples -> {args.out}" + (f"; {'; '.join(notes)}" if notes else ""), file=sys.stderr)
    return 1 if interrupted else 0


def kill_replica(sample: dict[str, Any], started: float, notes: list[str]) -> KillRecord | None:
    """SIGKILL the busiest RUNNING engine replica of `sample`; None (and a note) when there is none."""
    victim = pick_victim(sample)
    if victim is None:
        notes.append(f"no RUNNING replica with a pid to kill at {sample['t_s']:.1f} s")
        return None
    replica, entry = victim
    pid = int(entry["pid"])
    core_pids = child_pids(pid)  # with engine_process, the core process must exit by itself (it frees the GPU)
    os.kill(pid, signal.SIGKILL)
    kill_s = round(time.monotonic() - started, 3)
    print(f"  SIGKILL replica {replica} (pid {pid}, core processes {core_pids}) at {kill_s:.1f} s", file=sys.stderr)
    return KillRecord(
        replica=replica, pid=pid, core_pids=core_pids,
        num_running_at_kill=sample.get("metrics", {}).get(replica, {}).get("running"),
        replicas_before=sorted(sample["replicas"]), replicas_running_before=num_in_state(sample["replicas"]),
        kill_s=kill_s,
    )


def progress_line(sample: dict[str, Any]) -> str:
    parts = [f"t={sample['t_s']:.0f}s"]
    replicas = sample.get("replicas", {})
    for replica, metrics in sorted(sample.get("metrics", {}).items()):
        state = replicas.get(replica, {}).get("state", "-")
        kv = metrics.get("kv")
        parts.append(f"{replica[:8]} {state} kv {'-' if kv is None else f'{100 * kv:.0f}%'} "
                     f"run {metrics.get('running') or 0:.0f} done {sum(metrics['finished'].values()):.0f}")
    for key in ("replicas_error", "metrics_error"):
        if key in sample:
            parts.append(f"{key}: {sample[key]}")
    return " | ".join(parts)


# ---- summary ----------------------------------------------------------------------------------------------
def replica_letters(runs: list[dict[str, Any]]) -> dict[str, str]:
    """A, B, C, ... in order of first appearance over all runs (Serve's ids are long)."""
    letters: dict[str, str] = {}
    for run in runs:
        for sample in run["samples"]:
            for replica in sorted(sample.get("replicas", {})) + sorted(sample.get("metrics", {})):
                if replica not in letters:
                    letters[replica] = chr(ord("A") + len(letters)) if len(letters) < 26 else replica[:6]
    return letters


def kv_table(run: dict[str, Any], letters: dict[str, str], every_s: float) -> list[str]:
    """KV-cache usage (%) per replica every `every_s` seconds: the sample nearest each time.

    A replica shows '-' where Serve does not list it (killed, not yet started): the metrics agent keeps
    exporting a dead process's last gauge value for a while.
    """
    samples = [s for s in run["samples"] if "metrics" in s]
    if not samples:
        return ["(no metrics samples)"]
    shown = sorted({r for s in samples for r, m in s["metrics"].items() if m.get("kv") is not None},
                   key=lambda r: letters.get(r, r))
    lines = ["| t (s) | " + " | ".join(f"{letters.get(r, r)} kv %" for r in shown) + " |",
             "|---" * (len(shown) + 1) + "|"]
    t_s, end_s = 0.0, samples[-1]["t_s"]
    while t_s <= end_s + 1e-6:
        nearest = min(samples, key=lambda s: abs(s["t_s"] - t_s))
        cells = []
        for replica in shown:
            kv = nearest["metrics"].get(replica, {}).get("kv")
            listed = "replicas" not in nearest or replica in nearest["replicas"]
            cells.append("-" if kv is None or not listed else f"{100 * kv:.0f}")
        lines.append(f"| {t_s:.0f} | " + " | ".join(cells) + " |")
        t_s += every_s
    return lines


def format_finished(finished: dict[str, dict[str, float]], letters: dict[str, str]) -> str:
    parts = []
    for replica in sorted(finished, key=lambda r: letters.get(r, r)):
        by_reason = finished[replica]
        completed = sum(by_reason.get(reason, 0.0) for reason in COMPLETED_REASONS)
        others = ", ".join(f"{v:.0f} {k}" for k, v in sorted(by_reason.items()) if k not in COMPLETED_REASONS)
        parts.append(f"{letters.get(replica, replica)} {completed:.0f}" + (f" (+{others})" if others else ""))
    return ", ".join(parts) or "none"


def summary(paths: list[str], every_s: float) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    letters = replica_letters(runs)
    lines = ["## Two engine replicas: served W1, capacity, one replica killed", "",
             "| run | requests ok / sent | errors | served output tok/s | wall s | finished per replica (metrics) |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        load = run["load"]
        lines.append(
            f"| {run['name']} | {load.get('requests_ok', '?')} / {load.get('requests_sent', '?')} | "
            f"{load.get('errors', '?')} | {load.get('output_tokens_per_s', float('nan')):.1f} | "
            f"{load.get('wall_s', float('nan')):.1f} | {format_finished(run['finished_by_replica'], letters)} |")
    lines += ["", "Replicas: " + ", ".join(f"{letter} = {rid}" for rid, letter in letters.items())]
    for run in runs:
        lines += ["", f"### KV-cache usage per replica, {run['name']} (t: seconds since the load started)", ""]
        lines += kv_table(run, letters, every_s)
        kill = run.get("kill")
        if kill:
            lines += ["", f"### {run['name']}: SIGKILL of replica {letters.get(kill['replica'], kill['replica'])} "
                          f"(pid {kill['pid']}, {kill['num_running_at_kill'] or 0:.0f} running requests)", "",
                      "| event | t (s) | since kill (s) |", "|---|---|---|",
                      f"| kill | {kill['kill_s']:.1f} | 0 |"]
            replacement = letters.get(kill["replacement"], kill["replacement"]) if kill["replacement"] else "-"
            events = [("Serve no longer lists it RUNNING (its crash seen)", "serve_saw_it_gone_s"),
                      (f"replacement {replacement} listed by Serve", "replacement_listed_s"),
                      (f"replacement {replacement} RUNNING ({kill['replicas_running_before']} RUNNING)",
                       "replacement_running_s"),
                      (f"replacement {replacement}'s first finished request (metrics)", "replacement_first_finished_s"),
                      (f"its child processes {kill['core_pids']} (engine core) gone", "core_processes_gone_s")]
            for label, key in events:
                value, since = kill[key], kill["since_kill_s"][key]
                lines.append(f"| {label} | {'-' if value is None else f'{value:.1f}'} | "
                             f"{'not seen' if since is None else f'{since:.1f}'} |")
            load = run["load"]
            lines += ["", f"Failed requests (serve_bench): {load.get('requests_failed', '?')} of "
                          f"{load.get('requests_sent', '?')}, errors {load.get('errors', '?')}."]
            if run.get("probes"):
                lines.append(f"Probe requests after the load (to reach the replacement): {run['probes']['ok']} ok, "
                             f"{run['probes']['failed']} failed, from {kill['probes_started_s']:.1f} s.")
        if run.get("notes"):
            lines += ["", "Notes: " + "; ".join(run["notes"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8000", help="the service (OpenAI API)")
    common.add_argument("--dashboard-url", default="http://127.0.0.1:8265", help="Ray dashboard (Serve's REST API)")
    common.add_argument("--metrics-url", default="http://127.0.0.1:8090/metrics",
                        help="Ray's metrics agent (ray start --metrics-export-port)")
    common.add_argument("--app", default="pagedserve", help="Serve application name")
    common.add_argument("--deployment", default="EngineReplica", help="the engine replicas' deployment")
    common.add_argument("--http-timeout-s", type=float, default=5.0)

    wait_parser = sub.add_parser("wait", parents=[common], help="until the service answers with N replicas RUNNING")
    wait_parser.add_argument("--replicas", type=int, default=2)
    wait_parser.add_argument("--timeout-s", type=float, default=300.0)
    wait_parser.add_argument("--serve-pid", type=int, default=None, help="give up when this process exits")

    watch_parser = sub.add_parser("watch", parents=[common], help="sample while a load command runs")
    watch_parser.add_argument("--out", required=True, help="JSON file")
    watch_parser.add_argument("--name", default=None, help="run name in the summary (default: the file's stem)")
    watch_parser.add_argument("--load-out", default=None, help="file for the load command's stdout")
    watch_parser.add_argument("--interval-s", type=float, default=0.5)
    watch_parser.add_argument("--kill-replica-after", type=float, default=None, metavar="S",
                              help="SIGKILL the busiest engine replica S seconds after the load started")
    watch_parser.add_argument("--recovery-timeout-s", type=float, default=300.0,
                              help="after a kill, stop waiting for the replacement's first request after this long")
    watch_parser.add_argument("--tail-s", type=float, default=4.0, help="keep sampling this long after the load")
    watch_parser.add_argument("--max-s", type=float, default=600.0, help="hard bound on the whole watch")
    watch_parser.add_argument("--probe-concurrency", type=int, default=4)
    watch_parser.add_argument("--report-every-s", type=float, default=10.0, help="progress line on stderr")
    watch_parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the load command")

    summary_parser = sub.add_parser("summary", help="markdown summary of watch files")
    summary_parser.add_argument("files", nargs="+")
    summary_parser.add_argument("--every-s", type=float, default=5.0, help="rows of the KV-usage tables")
    args = parser.parse_args()

    if args.mode == "wait":
        sys.exit(wait_ready(args))
    if args.mode == "watch":
        args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not args.command:
            parser.error("watch needs a load command after --")
        sys.exit(watch(args))
    print(summary(args.files, args.every_s))


if __name__ == "__main__":
    main()
