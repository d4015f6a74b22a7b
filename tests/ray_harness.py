"""Ray Serve clusters for tests: distinct free ports, a cluster that always shuts down, a health wait."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator


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


@contextlib.contextmanager
def local_serve(env_vars: dict[str, str] | None = None, **ray_init_kwargs) -> Iterator[int]:
    """A Ray cluster of our own (8 logical CPUs) with Serve's proxy on 127.0.0.1; yields the HTTP port.

    A picked port can be taken by one of Ray's own processes before the proxy binds it, so the proxy
    start is retried on fresh ports. Ray and Serve are shut down however the block ends, also when the
    set-up fails, so a failing module never leaves a cluster behind for the next one. Token auth is off so
    the tests can read the dashboard REST API.
    """
    import ray
    from ray import serve

    previous_auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        # address="local": a cluster of its own, even where another one (or a stale record of one in
        # /tmp/ray/ray_current_cluster) exists on this machine.
        ray.init(address="local", num_cpus=8, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", **(env_vars or {})}}, **ray_init_kwargs)
        for attempt in range(3):
            http_port = _free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": http_port})
                break
            except Exception:  # noqa: BLE001 - the port was taken meanwhile: try another
                serve.shutdown()
                if attempt == 2:
                    raise
        yield http_port
    finally:
        if ray.is_initialized():  # else serve.shutdown() would connect to whatever cluster it finds
            serve.shutdown()
        ray.shutdown()
        if previous_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth_mode


def wait_until_healthy(base: str, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base}/health did not answer 200 within {timeout_s:.0f} s")


@contextlib.contextmanager
def fake_engine_app(app_name: str, args: dict, **ray_init_kwargs) -> Iterator[str]:
    """The service with `FakeAsyncEngine` replicas (tests/serve_app/fake_engine.py, which the workers import
    through PYTHONPATH) on a cluster of its own (`local_serve`); `args` are the app's args, the engine class
    added. Yields the HTTP base URL once /health answers."""
    from pathlib import Path

    from pagedserve.serve_app import build_app
    from ray import serve

    fake_engine_dir = str(Path(__file__).resolve().parent / "serve_app")
    with local_serve(env_vars={"PYTHONPATH": fake_engine_dir}, **ray_init_kwargs) as http_port:
        serve.run(build_app({"engine_class": "fake_engine:FakeAsyncEngine", **args}), name=app_name,
                  route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        wait_until_healthy(base, timeout_s=120)
        yield base
