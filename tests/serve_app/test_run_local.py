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
