"""`make serve` (serve_app/run_local.py): what it checks before it starts a local Ray."""

from __future__ import annotations

import socket

import pytest

from pagedserve.serve_app import run_local


@pytest.fixture
def listening_port():
    """A port another service listens on the way Serve's proxy does (SO_REUSEPORT): a second proxy could bind
    it too, and the kernel would then share the connections between the two services."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_port_another_service_listens_on_ends_it_before_ray_starts(host, listening_port, tmp_path, monkeypatch):
    """Found by starting a second `make serve` while one ran: Serve's proxy binds with SO_REUSEPORT, so both
    listened on the port, the new one printed "pagedserve is ready" at once (the old one answered its /health)
    and clients were dealt between the two services. It now exits, naming the address, before Ray starts."""
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    config = tmp_path / "serve.yaml"
    config.write_text(f"http_options:\n  host: {host}\n  port: {listening_port}\n")
    with pytest.raises(SystemExit) as exited:
        run_local.main([str(config)])
    message = str(exited.value.code)
    assert f"{host}:{listening_port}" in message and "already in use" in message, message


def test_a_free_port_passes(tmp_path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    run_local.check_http_port_free("127.0.0.1", port)  # nothing raised


def test_an_application_that_failed_to_deploy_is_said_and_stops_the_service(capsys):
    """Found with `engine.model` set to a path that is not there: Serve gave up on the engine replicas
    (DEPLOY_FAILED) and stopped trying, yet `make serve` went on for its 30 minutes' wait, printing nothing
    more, while the ingress answered 503 or held requests. It now says so, with the reason, and stops."""
    stops = []
    failure = "EngineReplica: ModelLoadError: EngineConfig.model='/models/missing': no such file or folder"
    ready = run_local.announce_when_ready(f"http://127.0.0.1:{free_port()}/health", "READY", timeout_s=30,
                                          read_deploy_failure=lambda: failure, stop=lambda: stops.append(True))
    assert not ready and stops == [True]
    out = capsys.readouterr().out
    assert "failed to deploy" in out and failure in out and "READY" not in out


def test_deploy_failure_is_read_from_serve_status():
    from types import SimpleNamespace

    def status(app_status: str, deployment_message: str):
        deployment = SimpleNamespace(status=app_status, message=deployment_message)
        app = SimpleNamespace(status=app_status, message="Failed to update the deployments ['EngineReplica'].",
                              deployments={"EngineReplica": deployment})
        return SimpleNamespace(applications={"pagedserve": app})

    failed = status("DEPLOY_FAILED", "The deployment failed to start 3 times in a row.\nTraceback ...\n"
                                     "pagedserve.engine.errors.ModelLoadError: EngineConfig.model='/x': no such file")
    assert run_local.deploy_failure(failed) == (
        "EngineReplica: pagedserve.engine.errors.ModelLoadError: EngineConfig.model='/x': no such file")
    assert run_local.deploy_failure(status("DEPLOYING", "")) is None
    assert run_local.deploy_failure(SimpleNamespace(applications={})) is None


def free_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
