"""`make serve`: `serve run <config>` on a local Ray whose ports are known, and the URLs printed once it answers.

`serve run` alone starts a local Ray with its Prometheus endpoint (the metrics agent's export port) on a
random port that nothing prints. This starts that Ray first, with the export port pinned
($PAGEDSERVE_METRICS_PORT, default 8080, the port KubeRay pods use) and the dashboard on
$PAGEDSERVE_DASHBOARD_PORT (default 8265, Ray's), then runs `serve run` in this process (it keeps a Ray it
finds initialized), and once the application's /health answers prints the OpenAI base URL, the metrics URL
and the dashboard URL. Ctrl-C or SIGTERM to this process stops Serve and the local Ray. It refuses to start
where something listens on the HTTP port already, and exits 1 with the reason when the application fails to
deploy (Serve then stops trying).

    python -m pagedserve.serve_app.run_local config/serve.yaml [serve run options...]
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_PORT_ENV = "PAGEDSERVE_METRICS_PORT"
DASHBOARD_PORT_ENV = "PAGEDSERVE_DASHBOARD_PORT"
DEFAULT_METRICS_PORT = 8080
DEFAULT_DASHBOARD_PORT = 8265
READY_TIMEOUT_S = 1800.0  # the first start builds the demo model (minutes on a small CPU)


def port_from_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or not 0 < int(value) < 65536:
        sys.exit(f"${name}={value!r}: must be a port number, 1-65535")
    return int(value)


def read_config(config_path: Path) -> dict[str, Any]:
    """The Serve config file, parsed (an empty file is an empty config)."""
    import yaml

    return yaml.safe_load(config_path.read_text()) or {}


def listen_address(config: dict[str, Any]) -> tuple[str, int]:
    """(host, port) Serve's proxy binds for the config; Serve's defaults where it says nothing."""
    http = config.get("http_options") or {}
    return http.get("host") or "127.0.0.1", int(http.get("port") or 8000)


def http_address(config: dict[str, Any]) -> tuple[str, int, str]:
    """(host, port, route prefix) the config serves at, as a client on this machine reaches it."""
    host, port = listen_address(config)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    applications = config.get("applications") or [{}]
    prefix = (applications[0].get("route_prefix") or "/").rstrip("/")
    return host, port, prefix


def check_http_port_free(host: str, port: int) -> None:
    """Exit naming the address when something listens on it already (another `make serve`, say). Serve's proxy
    binds with SO_REUSEPORT, so it would not fail: both services would listen, the kernel would deal the
    connections between them, and the ready message would come from the other one's /health."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no owner
        try:
            sock.bind((host, port))
        except OSError as exc:
            sys.exit(f"pagedserve: {host}:{port} is already in use ({exc.strerror}): another service (an earlier "
                     f"`make serve`?) listens there; stop it, or set http_options.port in the config")


def ready_message(base_url: str, metrics_url: str, dashboard_url: str) -> str:
    return (
        "\npagedserve is ready\n"
        f"  OpenAI API  {base_url}/v1   (curl {base_url}/v1/models)\n"
        f"  metrics     {metrics_url}   (Prometheus text: ray_pagedserve_*, ray_vllm_*, ray_serve_*;"
        f" port from ${METRICS_PORT_ENV})\n"
        f"  dashboard   {dashboard_url}   (Ray dashboard; port from ${DASHBOARD_PORT_ENV})\n"
    )


def deploy_failure(status: Any) -> str | None:
    """What failed, from `serve.status()`, when an application is DEPLOY_FAILED (Serve has stopped trying);
    else None. Each failed deployment's reason is the last line of its message (the exception raised)."""
    for app in status.applications.values():
        if app.status != "DEPLOY_FAILED":
            continue
        reasons = [f"{name}: {(deployment.message or '').strip().splitlines()[-1]}"
                   for name, deployment in app.deployments.items()
                   if deployment.status == "DEPLOY_FAILED" and (deployment.message or "").strip()]
        return "; ".join(reasons) or app.message or "DEPLOY_FAILED"
    return None


def _serve_deploy_failure() -> str | None:
    from ray import serve

    return deploy_failure(serve.status())


def _terminate_self() -> None:
    # A real signal: it wakes `serve run`'s sleeping main thread (interrupt_main would not), and the SIGTERM
    # handler raises the KeyboardInterrupt that `serve run` answers by shutting Serve down.
    os.kill(os.getpid(), signal.SIGTERM)


def announce_when_ready(health_url: str, message: str, timeout_s: float = READY_TIMEOUT_S,
                        read_deploy_failure: Callable[[], str | None] = _serve_deploy_failure,
                        stop: Callable[[], None] = _terminate_self) -> bool:
    """Poll /health until it answers 200, then print `message` and return True (a daemon thread: it never
    holds the exit). Serve does not retry an application that failed to deploy (a model path that is not
    there, say): that is printed with its reason and `stop` is called, rather than waiting out `timeout_s`
    while the ingress answers 503."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=5) as response:
                if response.status == 200:
                    print(message, flush=True)
                    return True
        except Exception:  # noqa: BLE001 - not up yet
            pass
        try:
            failure = read_deploy_failure()
        except Exception:  # noqa: BLE001 - Serve not started yet
            failure = None
        if failure is not None:
            print(f"\npagedserve: the application failed to deploy, and Serve does not retry it: {failure}\n"
                  "(the log above has the whole error); stopping", flush=True)
            stop()
            return False
        time.sleep(1.0)
    print(f"pagedserve: {health_url} did not answer within {timeout_s:g} s; see the log above", flush=True)
    return False


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    # `serve run` shuts Serve down on KeyboardInterrupt, and the local Ray goes with the process at exit.
    raise KeyboardInterrupt


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    config = read_config(Path(argv[0]))
    check_http_port_free(*listen_address(config))
    import ray
    from ray.serve.scripts import cli

    metrics_port = port_from_env(METRICS_PORT_ENV, DEFAULT_METRICS_PORT)
    dashboard_port = port_from_env(DASHBOARD_PORT_ENV, DEFAULT_DASHBOARD_PORT)
    host, port, prefix = http_address(config)
    ray.init(namespace="serve", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             _metrics_export_port=metrics_port)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # after ray.init, which installs a handler of its own
    base_url = f"http://{host}:{port}{prefix}"
    message = ready_message(base_url, f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{dashboard_port}")
    failed = threading.Event()

    def stop_failed() -> None:
        failed.set()
        _terminate_self()

    threading.Thread(target=announce_when_ready, args=(f"{base_url}/health", message), kwargs={"stop": stop_failed},
                     daemon=True).start()
    try:
        cli.main(["run", *argv], prog_name="serve", standalone_mode=True)
    except SystemExit:
        if failed.is_set():  # `serve run` exits 0 after the interrupt; a failed start is not a success
            sys.exit(1)
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
