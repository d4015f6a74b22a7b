"""serve_app/channel_socket.py: the stream channel over a TCP connection of its own (loopback only here)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from pagedserve.serve_app import channel_socket
from pagedserve.serve_app.channel_socket import LOOPBACK, ChannelAddress, ChannelServer
from pagedserve.serve_app.stream_channel import Outboxes


def _server(node_ip: str = "") -> tuple[ChannelServer, Outboxes]:
    outboxes = Outboxes(channel_idle_s=0.01, wall_clock=lambda: 5.0)
    return ChannelServer(outboxes, node_ip=node_ip), outboxes


async def _three_items_through(outbox, messages) -> list:
    """Put three items one by one, and read them from `messages` (within 2 s)."""
    received: list = []
    for index in range(3):
        outbox.put("after", index)
        await asyncio.sleep(0.02)
    async with asyncio.timeout(2):
        while len(received) < 3:
            received += (await messages.__anext__()).items
    return received


def test_messages_arrive_in_order_and_an_idle_channel_ends_cleanly() -> None:
    async def run() -> list:
        server, outboxes = _server()
        address = await server.address_for("")
        with outboxes.request("ingress-a") as outbox:
            outbox.put("req1", "first")
            reader, writer = await channel_socket.connect(address, "ingress-a")
            received = []
            messages = channel_socket.read_messages(reader, writer)
            received.append(await messages.__anext__())
            outbox.put("req1", "second")
            outbox.put("req2", "third")
            received.append(await messages.__anext__())
        # No request of that ingress left: after channel_idle_s the replica sends the end frame.
        async for message in messages:
            received.append(message)
        server.close()
        return received

    first, second = asyncio.run(run())
    assert first.items == [("req1", "first")] and first.sent_at_s == 5.0
    assert second.items == [("req1", "second"), ("req2", "third")]


def test_a_wrong_secret_is_closed_at_once_and_a_dropped_connection_is_a_lost_one() -> None:
    async def run() -> tuple[type, type]:
        server, outboxes = _server()
        address = await server.address_for("")
        forged = ChannelAddress(address.host, address.port, b"\0" * channel_socket.SECRET_BYTES)
        with outboxes.request("ingress-a"):
            reader, writer = await channel_socket.connect(forged, "ingress-a")
            with pytest.raises(ConnectionError) as wrong:
                await channel_socket.read_messages(reader, writer).__anext__()
            reader, writer = await channel_socket.connect(address, "ingress-a")
            pending = asyncio.ensure_future(channel_socket.read_messages(reader, writer).__anext__())
            await asyncio.sleep(0.05)
            assert server.num_connections == 1
            server.close()  # as a replica's process dies: no end frame
            with pytest.raises(ConnectionError) as dropped:
                await pending
        return type(wrong.value), type(dropped.value)

    assert all(issubclass(kind, ConnectionError) for kind in asyncio.run(run()))


def test_a_connection_the_ingress_drops_stops_taking_items_so_its_next_connection_gets_them_all() -> None:
    """The ingress's side of a channel can end while the replica lives (a failure of its own, a reset on the way):
    the replica must stop taking that ingress's items then, not at its next write, or the items of a request that
    lands there afterwards go into the dead connection and never reach the ingress's new one."""
    async def run() -> tuple[int, list]:
        server, outboxes = _server()
        outboxes.channel_idle_s = 5.0  # no idle end during the test
        address = await server.address_for("")
        with outboxes.request("ingress-a") as outbox:
            outbox.put("before", "a")
            reader, writer = await channel_socket.connect(address, "ingress-a")
            first = channel_socket.read_messages(reader, writer)
            await first.__anext__()
            await first.aclose()  # the ingress closes this connection; the replica and the request live on
            for _ in range(100):
                if server.num_connections == 0:
                    break
                await asyncio.sleep(0.01)
            num_connections = server.num_connections
            second = channel_socket.read_messages(*await channel_socket.connect(address, "ingress-a"))
            received = await _three_items_through(outbox, second)
        server.close()
        return num_connections, received

    num_connections, received = asyncio.run(run())
    assert num_connections == 0
    assert received == [("after", 0), ("after", 1), ("after", 2)]


def test_an_ingress_s_new_connection_replaces_one_whose_end_never_reached_the_replica() -> None:
    """The ingress opens a channel only once it is done with the previous one; where the end of that one never
    reached the replica (a connection left half open on the way), the new one must still get every item."""
    async def run() -> tuple[int, list]:
        server, outboxes = _server()
        outboxes.channel_idle_s = 5.0
        address = await server.address_for("")
        with outboxes.request("ingress-a") as outbox:
            abandoned = await channel_socket.connect(address, "ingress-a")  # open, but nobody reads it any more
            await asyncio.sleep(0.05)
            second = channel_socket.read_messages(*await channel_socket.connect(address, "ingress-a"))
            await asyncio.sleep(0.05)
            received = await _three_items_through(outbox, second)
            num_connections = server.num_connections
            abandoned[1].close()
        server.close()
        return num_connections, received

    num_connections, received = asyncio.run(run())
    assert received == [("after", 0), ("after", 1), ("after", 2)]
    assert num_connections == 1  # the replica closed the stale one


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux's keep-alive timers")
def test_the_ingress_probes_its_connection_so_a_replica_host_that_vanishes_silently_ends_it() -> None:
    # Loopback always answers the probes; what is checked is that the kernel sends them, on the timers set.
    async def run() -> tuple[int, ...]:
        server, outboxes = _server()
        address = await server.address_for("")
        with outboxes.request("ingress-a"):
            _, writer = await channel_socket.connect(address, "ingress-a")
            connection = writer.get_extra_info("socket")
            options = (connection.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                       *(connection.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                         for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")))
            writer.close()
        server.close()
        return options

    keepalive, idle_s, interval_s, probes = asyncio.run(run())
    assert keepalive == 1
    assert (idle_s, interval_s, probes) == (channel_socket.KEEPALIVE_IDLE_S, channel_socket.KEEPALIVE_INTERVAL_S,
                                             channel_socket.KEEPALIVE_PROBES)
    assert idle_s + interval_s * probes <= 60  # dropped within a minute, not the system's two hours


def test_a_frame_cut_short_is_a_lost_connection_not_an_idle_end() -> None:
    async def run() -> None:
        async def half_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(struct.pack("!I", 100) + b"x" * 10)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(half_frame, LOOPBACK, 0)
        reader, writer = await asyncio.open_connection(LOOPBACK, server.sockets[0].getsockname()[1])
        with pytest.raises(ConnectionResetError):
            await channel_socket.read_messages(reader, writer).__anext__()
        server.close()

    asyncio.run(run())


def test_loopback_for_an_ingress_on_this_node_and_the_node_address_for_another() -> None:
    async def run() -> tuple[str, str, str, int]:
        server, _ = _server(node_ip="127.0.0.2")  # another loopback address stands for the node's own
        same = await server.address_for("127.0.0.2")
        unknown = await server.address_for("")
        other = await server.address_for("10.1.2.3")
        again = await server.address_for("10.1.2.4")
        server.close()
        return same.host, unknown.host, other.host, int(other.port == again.port and other.secret == same.secret)

    same, unknown, other, reused = asyncio.run(run())
    assert same == unknown == LOOPBACK
    assert other == "127.0.0.2" and reused == 1  # one listener per address, one secret per replica
