"""The stream channel over a TCP connection of its own, beside Ray: one hop from engine replica to ingress.

A stream channel message sent as the item of a Ray Serve streaming call crosses the replica's Serve wrapper, the
two processes' Ray core workers and the ingress's router loop: measured on the 2-core CPU machine, a message
every 20 ms took 1.1 ms at the median and 2-5 ms at p99 between two plain Ray actors' async generators, and
through Serve's replicas p50 1-2 ms and p99 7.5 ms, where the same message over a loopback socket between the
same two actors took 0.2 ms and 0.35 ms (docs/deploy.md, "How tokens reach the clients"). A token waits that hop
on every step, so its tail is the tail of inter-token latency. Here the ingress asks the engine replica, by a
call through the router like any other (`EngineReplica.channel_address`), where to connect, and then reads the
channel's messages from that connection:

- The replica listens on 127.0.0.1 for ingresses on its own node and on its node's address only once an
  ingress on another node asks (`ChannelServer.address_for`), each on a port the OS picks.
- A connection starts with the replica's secret (random, per replica, handed out only by the call above, inside
  the cluster) and the ingress's id; a wrong secret is closed at once. Only the ingress unpickles: it reads what
  the replica it asked sends, and the replica reads nothing but the handshake.
- Then frames: a 4-byte big-endian length and a pickled `ChannelMessage`, in order, written as the outbox
  fills (the writer's drain is the back-pressure: a reader behind makes the outbox's next message larger, not
  the queue longer). When the outbox has been idle `channel_idle_s` with no request of that ingress left, the
  replica sends an empty frame and closes, as it ends a Ray channel call: the ingress reads an idle channel.
  A connection that ends without that frame is a lost replica (or a lost way to it). The replica watches for
  the ingress's end closing too: its channel stops there at once, and what waits goes to the next one (which
  also replaces a connection of that ingress whose end never came).

Where no connection can be made (a firewall between nodes, a node address the replica cannot listen on), the
ingress falls back to the Ray channel call for that replica, and tries the socket again after `SOCKET_RETRY_S`
(serve_app/stream_channel.py, `ChannelHub`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import pickle
import secrets
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pagedserve.serve_app.messages import ChannelMessage

logger = logging.getLogger("ray.serve")

SECRET_BYTES = 16
_LENGTH = struct.Struct("!I")
_ID_LENGTH = struct.Struct("!H")
HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"
# The ingress only reads, so a replica whose host vanishes without a close (power, a cut network) would leave it
# waiting on the connection for ever, and a request whose last delta was in flight with it (a Ray channel call
# fails once Ray declares the node dead): TCP probes a connection silent this long and drops it after the probes
# go unanswered, about 30 s in all.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 4


@dataclass(frozen=True)
class ChannelAddress:
    """Where an ingress reads its stream channel from one engine replica, and the secret that opens it."""

    host: str
    port: int
    secret: bytes


class ChannelServer:
    """The engine replica's end: one listener per address it was asked for, each connection serving one
    ingress's outbox (`outboxes.channel(ingress_id)`: a `ChannelMessage` whenever items wait)."""

    def __init__(self, outboxes: object, node_ip: str = "") -> None:
        self._outboxes = outboxes  # serve_app/stream_channel.py Outboxes
        self.node_ip = node_ip
        self._secret = secrets.token_bytes(SECRET_BYTES)
        self._servers: dict[str, asyncio.Server] = {}
        self._lock = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()  # the open connections
        self._sending: dict[str, asyncio.Task] = {}  # each ingress's channel: its newest connection's sender

    async def address_for(self, peer_node_ip: str) -> ChannelAddress | None:
        """The address an ingress on `peer_node_ip` connects to: loopback from this node (or an unknown one), the
        node's own address from another node. Listens there first if nobody asked for it yet; None where it
        cannot (Ray's address for a node, given by hand or a NAT's, need not be one of its interfaces'): that
        ingress takes the Ray channel call instead, as where it cannot connect."""
        host = LOOPBACK if not peer_node_ip or not self.node_ip or peer_node_ip == self.node_ip else self.node_ip
        async with self._lock:
            server = self._servers.get(host)
            if server is None:
                try:
                    server = await asyncio.start_server(self._serve, host, 0)
                except OSError as exc:
                    logger.warning("stream channels cannot listen on %s (%s); ingresses that would connect there "
                                   "take Ray calls", host, exc)
                    return None
                self._servers[host] = server
                logger.info("stream channels over TCP on %s:%d", host, server.sockets[0].getsockname()[1])
        return ChannelAddress(host, server.sockets[0].getsockname()[1], self._secret)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                secret = await reader.readexactly(SECRET_BYTES)
                (id_length,) = _ID_LENGTH.unpack(await reader.readexactly(_ID_LENGTH.size))
                ingress_id = (await reader.readexactly(id_length)).decode()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, UnicodeDecodeError):
            writer.close()
            return
        if not hmac.compare_digest(secret, self._secret):
            logger.warning("stream channel connection from %s closed: wrong secret", writer.get_extra_info("peername"))
            writer.close()
            return
        self._writers.add(writer)
        # An ingress opens a channel only once it is done with its previous one, so one still here is stale (its
        # end never reached this side: a connection left half open) and would take items the new one must carry.
        stale = self._sending.get(ingress_id)
        if stale is not None:
            stale.cancel()
        sending = self._sending[ingress_id] = asyncio.get_running_loop().create_task(self._send(ingress_id, writer))
        # The ingress sends nothing after the handshake, so this read ends only when its end of the connection
        # closes or resets. The channel then stops at once, as a Ray channel call that the ingress cancels does:
        # left to notice at its next write, it would take the outbox's next items into a connection nobody reads,
        # items of requests that the ingress's next channel is there to carry.
        closed = asyncio.get_running_loop().create_task(_until_closed(reader))
        try:
            await asyncio.wait((sending, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            sending.cancel()
            if self._sending.get(ingress_id) is sending:
                del self._sending[ingress_id]
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, ingress_id: str, writer: asyncio.StreamWriter) -> None:
        """Frames of `ingress_id`'s outbox until it is idle (then the end frame) or the connection fails."""
        try:
            async with contextlib.aclosing(self._outboxes.channel(ingress_id)) as messages:
                async for message in messages:
                    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
                    writer.write(_LENGTH.pack(len(body)) + body)
                    await writer.drain()  # a reader behind: the next message gathers what waits meanwhile
            writer.write(_LENGTH.pack(0))  # idle: the end, as opposed to a connection lost
            await writer.drain()
        except OSError:
            pass  # the ingress, or the way to it, went away; its requests end by their own calls

    @property
    def num_connections(self) -> int:
        return len(self._writers)

    def close(self) -> None:
        """Stop listening and drop every connection without its end frame: the ingresses read a lost replica."""
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        for writer in list(self._writers):
            writer.transport.abort()


async def _until_closed(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):  # a reset, or a dead peer's timeout, ends it as a close does
        await reader.read(1)


def node_ip() -> str:
    """This process's node address as Ray knows it; "" outside a Ray worker (tests: everything is one node)."""
    import ray

    if not ray.is_initialized():
        return ""
    return ray.util.get_node_ip_address()


async def connect(address: ChannelAddress, ingress_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open one replica's channel for `ingress_id` (raises OSError or TimeoutError where it cannot)."""
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(address.host, address.port)
    _keep_alive(writer.get_extra_info("socket"))
    name = ingress_id.encode()
    writer.write(address.secret + _ID_LENGTH.pack(len(name)) + name)
    return reader, writer


def _keep_alive(connection: socket.socket) -> None:
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, option):  # Linux's names; elsewhere the system's timers
            connection.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def read_messages(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> AsyncIterator[ChannelMessage]:
    """The channel's messages until the replica ends it idle (the iterator ends); a connection that ends
    otherwise raises `OSError` (`ConnectionError`; `TimeoutError` where the keep-alive probes went unanswered)."""
    try:
        while True:
            try:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if length == 0:
                    return  # the replica ended an idle channel
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError as end:
                raise ConnectionResetError("the engine replica's stream channel connection closed") from end
            yield pickle.loads(body)
    finally:
        writer.close()
