"""Ray Serve for tests: one local cluster for the whole session, one Serve application per module on it.

Starting and stopping a cluster costs seconds each time, so the Ray tests share one (the `ray_cluster`
fixture of tests/serve_app/conftest.py). Each module deploys its own application under a route prefix of
its own (`/<name>`), so a module's replicas, handles, faults and logs stay its own, and deletes it when it
is done; modules that need the same plain service share one deployed for the session instead
(`two_ingress_service` there). Everything a module needs from the cluster itself is set here once: 8 logical CPUs, the dashboard
(its REST API is tested), Ray's metrics agent on a port of its own reporting every 0.5 s (the metrics test
scrapes it), and tests/serve_app on the workers' PYTHONPATH (where `FakeAsyncEngine` lives).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAKE_ENGINE_DIR = str(Path(__file__).resolve().parent / "serve_app")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nobody listens on now: all are held open together, so none repeats."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _free_port() -> int:
    return free_ports(1)[0]


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str | Callable[[], str],
             period_s: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy (returned); an exception counts as not yet.
    After `timeout_s` raises AssertionError naming `what` (a callable is asked then, so it can describe the
    last state seen) and the last exception."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - not ready yet: try again until the deadline
            last_error = error
        if time.monotonic() >= deadline:
            description = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {description}; last error: {last_error!r}")
        time.sleep(period_s)


@dataclass(frozen=True)
class RayCluster:
    http_port: int
    dashboard_url: str
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def base_url(self, app_name: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{app_name}"


@contextlib.contextmanager
def local_cluster() -> Iterator[RayCluster]:
    """A Ray cluster of our own with Serve's proxy on 127.0.0.1 (see the module docstring for its settings).

    A picked port can be taken by one of Ray's own processes before the proxy binds it, so the proxy
    start is retried on fresh ports. Ray is shut down however the block ends, also when the set-up fails,
    so no cluster is left behind: `ray.shutdown()` of a cluster this process started ends every process
    of it, Serve's included (an engine core or tensor-parallel worker exits with its replica), in about a
    second where `serve.shutdown()` first would stop each application gracefully for several more. Token
    auth is off so the tests can read the dashboard REST API.
    """
    import ray
    from ray import serve

    previous_auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    dashboard_port, metrics_port = free_ports(2)
    try:
        # address="local": a cluster of its own, even where another one (or a stale record of one in
        # /tmp/ray/ray_current_cluster) exists on this machine.
        ray.init(address="local", num_cpus=8, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": FAKE_ENGINE_DIR}},
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                 _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 500})
        for attempt in range(3):
            http_port = _free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": http_port})
                break
            except Exception:  # noqa: BLE001 - the port was taken meanwhile: try another
                serve.shutdown()
                if attempt == 2:
                    raise
        yield RayCluster(http_port=http_port, dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                         metrics_port=metrics_port)
    finally:
        ray.shutdown()
        if previous_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth_mode


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample line of a Prometheus text exposition, such as the cluster's metrics
    agent serves at `RayCluster.metrics_url` (comments and blank lines skipped)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if match is None:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        samples.append((match.group(1), labels, float(match.group(4))))
    return samples


def wait_until_healthy(base: str, timeout_s: float = 180.0) -> None:
    import httpx

    def answers() -> bool:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200

    wait_for(answers, timeout_s, f"{base}/health to answer 200", period_s=0.25)


@contextlib.contextmanager
def deployed(cluster: RayCluster, app_name: str, app: Any, timeout_s: float = 180.0) -> Iterator[str]:
    """Run `app` on `cluster` as `app_name` under the route prefix `/<app_name>`; yield its base URL once
    /health answers. The application is deleted when the block ends, however it ends."""
    from ray import serve

    serve.run(app, name=app_name, route_prefix=f"/{app_name}", blocking=False)
    try:
        base = cluster.base_url(app_name)
        wait_until_healthy(base, timeout_s)
        yield base
    finally:
        # Not blocking: Serve stops the replicas in the background (seconds), while the next module's
        # application, under a prefix of its own, already starts.
        serve.delete(app_name, _blocking=False)


def build_app_with(args: dict, **replica_options: Any) -> Any:
    """`build_app(args)` with some of the engine replicas' Serve deployment options replaced (a shorter
    health-check period, say, where a test waits for Serve to replace a replica)."""
    import importlib

    # The module, not the `app` builder function that pagedserve.serve_app exports under the same name.
    app_module = importlib.import_module("pagedserve.serve_app.app")
    product_options = app_module.replica_options
    app_module.replica_options = lambda serve_args: {**product_options(serve_args), **replica_options}
    try:
        return app_module.build_app(args)
    finally:
        app_module.replica_options = product_options


@contextlib.contextmanager
def fake_engine_app(cluster: RayCluster, app_name: str, args: dict, timeout_s: float = 120.0,
                    **replica_options: Any) -> Iterator[str]:
    """The service with `FakeAsyncEngine` replicas (tests/serve_app/fake_engine.py, which the workers import
    through PYTHONPATH); `args` are the app's args, the engine class added; `replica_options` replace Serve
    deployment options of the engine replicas (`build_app_with`). Yields the base URL."""
    app = build_app_with({"engine_class": "fake_engine:FakeAsyncEngine", **args}, **replica_options)
    with deployed(cluster, app_name, app, timeout_s) as base:
        yield base
