"""The stream channel: how engine replicas send token deltas to an ingress replica.

One Ray message per token per stream costs the replica's event loop and the ingress's more than the engine
step that made the token, so with hundreds of streams the messages, not the GPU, set the pace. Here each
ingress replica keeps one channel per engine replica, and every message on it carries all the deltas that
engine replica produced for that ingress's requests since the last one: messages follow engine steps x
ingress replicas, whatever the number of streams. A channel is a TCP connection of its own
(serve_app/channel_socket.py: the ingress asks `EngineReplica.channel_address` where, then reads frames; one hop,
0.2 ms where Ray's streaming call took 1-2 ms) or, with `stream_channel_transport: ray` or where no connection
can be made, a long-lived Ray Serve streaming call (`EngineReplica.channel`). Both carry the same
`ChannelMessage`s from the same outbox.

Each engine request keeps a call of its own (`EngineReplica.submit`) for what is per request: routing by
free blocks, Serve's ongoing-request count (back-pressure, autoscaling), the router's release of its
reservation when the call ends, and cancellation (cancelling the call aborts the request and frees its
blocks). That call carries two items in all: `Accepted` (which replica holds the request) and its end.

Replica side: `Outboxes`, one `Outbox` per ingress replica, filled by the requests' tasks and drained by
that ingress's channel call (items wait while no channel is open). Ingress side: `ChannelHub` starts
engine requests (`ChanneledCall`, an async iterator of the request's items, with `cancel()`), opens a
channel to each replica the first time a request lands there, and hands each delta to its request's
`Inbox`. A channel that fails ends every request of this ingress on that replica with `ChannelLostError`,
which the ingress treats as a lost replica (the request goes on elsewhere).

A Ray channel is a call in flight, and a replica that Serve removes (scale-down, redeploy) waits for its calls
to end before it exits. So the replica ends a channel itself (either transport) once it has been idle for
`CHANNEL_IDLE_S` with no request of that ingress left on it: a draining replica, which gets no new requests, drains. The
ingress opens a new channel when its next request lands there (or at once, if one landed while the old
channel was closing).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle

from pagedserve.engine.core.request import RequestOutput, merge_delta

from pagedserve.serve_app import channel_socket
from pagedserve.serve_app.errors import ChannelLostError, KeyOverShareError
from pagedserve.serve_app.messages import Accepted, ChannelMessage, ChannelOpen, GenerateRequest, ReplicaError

logger = logging.getLogger("ray.serve")

Item = RequestOutput | ReplicaError

# A replica ends an ingress's channel after this long with nothing to send and no request of that ingress.
CHANNEL_IDLE_S = 0.5
# After a replica's socket could not be reached, its channels go through Ray for this long before the next try.
SOCKET_RETRY_S = 60.0


def is_last(item: Any) -> bool:
    """A request's last item: its finished delta, or an error."""
    return not isinstance(item, RequestOutput) or item.finished


def for_the_wire(output: RequestOutput) -> RequestOutput:
    """A delta without what the ingress already has: the prompt (text and ids) and engine timings travel
    only with the last delta (the usage count reads the ids there); a delta of 1,000 prompt tokens would
    otherwise pickle them with every token."""
    if output.finished:
        return output
    return dataclasses.replace(output, prompt=None, prompt_token_ids=[], metrics=None)


# Replica side --------------------------------------------------------------------------------------------


class Outbox:
    """Deltas for one ingress replica, in the order they were produced, until its channel takes them."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Item]] = []
        self._ready = asyncio.Event()
        self.num_requests = 0  # requests of this ingress running on the replica
        self.num_channels = 0  # open channel calls reading it (one, but for a moment when one replaces another)
        # Bumped by each channel that opens: the ingress opens one only once it is done with the previous one, so
        # an older channel still reading (its call's end has not reached this replica) must leave the items to it.
        self.channel_generation = 0
        self.num_messages = 0
        self.num_items = 0
        # Requests waiting for their last item to be on its way (`when_sent`), by request id.
        self._sent_waiters: dict[str, asyncio.Future] = {}

    def put(self, request_id: str, item: Item) -> None:
        self._items.append((request_id, item))
        self._ready.set()

    async def take(self, timeout_s: float | None = None) -> list[tuple[str, Item]]:
        """Everything queued, once there is something (one message); [] if nothing came within `timeout_s`."""
        while not self._items:
            self._ready.clear()
            try:
                async with asyncio.timeout(timeout_s):  # no task per wait, unlike wait_for: this runs every step
                    await self._ready.wait()
            except TimeoutError:
                return []
        items, self._items = self._items, []
        self._ready.clear()
        self.num_messages += 1
        self.num_items += len(items)
        return items

    def when_sent(self, request_id: str) -> asyncio.Future:
        """Done once a channel has handed on the request's last item (written to the ingress's connection, or
        yielded to the Ray channel call): call it after putting that item, before the next await."""
        future = self._sent_waiters.get(request_id)
        if future is None:
            future = self._sent_waiters[request_id] = asyncio.get_running_loop().create_future()
        return future

    def mark_sent(self, items: list[tuple[str, Item]]) -> None:
        """`items` are on their way: the requests whose last item is among them stop waiting."""
        for request_id, item in items:
            if is_last(item) and (future := self._sent_waiters.pop(request_id, None)) is not None:
                if not future.done():
                    future.set_result(None)

    def forget_sent(self, request_id: str) -> None:
        self._sent_waiters.pop(request_id, None)

    def put_back(self, items: list[tuple[str, Item]]) -> None:
        """Items taken by a channel that will not send them, back in front of anything queued since."""
        self._items[:0] = items
        self.num_messages -= 1
        self.num_items -= len(items)
        self._ready.set()

    @property
    def is_unused(self) -> bool:
        return self.num_requests == 0 and self.num_channels == 0

    @property
    def num_waiting_items(self) -> int:
        return len(self._items)


class Outboxes:
    """The replica's outboxes by ingress replica id. An outbox goes once nothing uses it and it is empty;
    one that still holds items when its last request ends waits `orphan_ttl_s` for its ingress's channel
    (a request can end before the channel its first delivery opens has arrived), then goes too (that
    ingress is gone)."""

    def __init__(self, orphan_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 channel_idle_s: float = CHANNEL_IDLE_S, wall_clock: Callable[[], float] = time.time) -> None:
        self._by_ingress: dict[str, Outbox] = {}
        self._unused_since: dict[str, float] = {}
        self.orphan_ttl_s = orphan_ttl_s
        self.channel_idle_s = channel_idle_s
        self._clock = clock
        self._wall_clock = wall_clock  # stamps each message: the ingress compares it with its own
        self.num_messages_closed = 0  # messages and items of outboxes already gone, for the totals
        self.num_items_closed = 0

    def get(self, ingress_id: str) -> Outbox:
        self._drop_orphans()
        outbox = self._by_ingress.get(ingress_id)
        if outbox is None:
            outbox = self._by_ingress[ingress_id] = Outbox()
        self._unused_since.pop(ingress_id, None)
        return outbox

    @contextlib.contextmanager
    def request(self, ingress_id: str) -> Iterator[Outbox]:
        outbox = self.get(ingress_id)
        outbox.num_requests += 1
        try:
            yield outbox
        finally:
            outbox.num_requests -= 1
            self._drop_if_idle(ingress_id, outbox)

    async def channel(self, ingress_id: str) -> AsyncIterator[ChannelMessage]:
        """The items of `ingress_id`'s requests, one message of all that is waiting at a time, for as long as the
        caller reads or until `channel_idle_s` pass with nothing to send and no request of that ingress here."""
        outbox = self.get(ingress_id)
        outbox.num_channels += 1
        outbox.channel_generation += 1
        generation = outbox.channel_generation
        try:
            while True:
                items = await outbox.take(self.channel_idle_s)
                if outbox.channel_generation != generation:  # a newer channel of this ingress replaced this one
                    if items:
                        outbox.put_back(items)
                    return
                if items:
                    yield ChannelMessage(items, self._wall_clock())
                    outbox.mark_sent(items)  # the reader asked for the next: these are written or with Ray
                elif outbox.num_requests == 0:
                    return  # idle: end the call, so that a replica being removed can drain
        finally:
            outbox.num_channels -= 1
            self._drop_if_idle(ingress_id, outbox)

    def _drop_if_idle(self, ingress_id: str, outbox: Outbox) -> None:
        if not outbox.is_unused or self._by_ingress.get(ingress_id) is not outbox:
            return
        if outbox.num_waiting_items:
            self._unused_since.setdefault(ingress_id, self._clock())
        else:
            self._drop(ingress_id)

    def _drop(self, ingress_id: str) -> None:
        outbox = self._by_ingress.pop(ingress_id)
        self._unused_since.pop(ingress_id, None)
        self.num_messages_closed += outbox.num_messages
        self.num_items_closed += outbox.num_items

    def _drop_orphans(self) -> None:
        now = self._clock()
        for ingress_id, since in list(self._unused_since.items()):
            if now - since > self.orphan_ttl_s and self._by_ingress[ingress_id].is_unused:
                logger.info("dropping %d undelivered items for ingress %s: no channel came for %g s",
                            self._by_ingress[ingress_id].num_waiting_items, ingress_id, self.orphan_ttl_s)
                self._drop(ingress_id)

    def stats(self) -> dict[str, Any]:
        outboxes = list(self._by_ingress.values())  # one step: Serve calls this from its thread pool
        return {
            "num_channels": sum(o.num_channels for o in outboxes),
            "num_messages": self.num_messages_closed + sum(o.num_messages for o in outboxes),
            "num_items": self.num_items_closed + sum(o.num_items for o in outboxes),
        }


# Ingress side --------------------------------------------------------------------------------------------

_END = object()  # an inbox's last item has been taken


class Inbox:
    """One engine request's items as they arrive. A reader that falls behind gets the deltas that arrived
    meanwhile as one (per request back-pressure: a slow client gets fewer, larger chunks, and nothing
    queues per token). After the last item (or an exception) it is closed and further items are dropped."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._is_closed = False  # the last item is queued

    def put(self, item: Any) -> None:
        if self._is_closed:
            return
        if isinstance(item, BaseException) or is_last(item):
            self._is_closed = True
        if (self._items and isinstance(item, RequestOutput) and isinstance(self._items[-1], RequestOutput)
                and not self._items[-1].finished):
            self._items[-1] = merge_delta(self._items[-1], item)
        else:
            self._items.append(item)
        self._ready.set()

    @property
    def is_closed(self) -> bool:
        """The last item (or an exception) has come, or the reader stopped: nothing more is expected."""
        return self._is_closed

    def close(self) -> None:
        """No more items: the reader gets what is queued, then the end."""
        self._is_closed = True
        self._ready.set()

    async def get(self) -> Any:
        """The next item, `_END` after the last one."""
        while not self._items:
            if self._is_closed:
                return _END
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class ChanneledCall:
    """One engine request: an async iterator of its items (`RequestOutput` deltas, then maybe a
    `ReplicaError`; an exception is raised) and `cancel()`, like a Serve streaming response."""

    def __init__(self, hub: "ChannelHub", request_id: str, call: Any) -> None:
        self._hub = hub
        self.request_id = request_id
        self._call = call  # EngineReplica.submit's response: Accepted, then the end of the request
        self.inbox = Inbox()
        self.replica_id: str | None = None
        self._watch: asyncio.Task | None = None
        # Called once when a replica accepts the request (the ingress's fair queue lets the key's next one go).
        self.on_accepted: Callable[[], None] | None = None
        self._is_cancelled = False

    def __aiter__(self) -> "ChanneledCall":
        return self

    async def __anext__(self) -> Any:
        if self.replica_id is None:
            accepted = await self._call.__anext__()  # a routing refusal or a lost replica raises here
            if isinstance(accepted, KeyOverShareError):  # the replica turned it back (serve_app/replica.py)
                raise accepted
            if not isinstance(accepted, Accepted):
                raise TypeError(f"EngineReplica.submit sent {type(accepted).__name__} first, not Accepted")
            self.replica_id = accepted.replica_id
            self._hub._accepted(self)
            self._watch = asyncio.create_task(self._watch_call())
            if self.on_accepted is not None:
                self.on_accepted()
        item = await self.inbox.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException) or is_last(item):
            self._hub._forget(self)
        if isinstance(item, BaseException):
            raise item
        return item

    async def _watch_call(self) -> None:
        """Wait for the request's call to end: normally after its last delta was queued for the channel;
        with an exception (the replica was lost) that becomes the request's last item."""
        try:
            async for _ in self._call:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the reader decides what a failed call means
            if not self._is_cancelled:
                self.inbox.put(exc)
        # Ended normally: the last delta was queued for the channel before the call ended, and comes that way.

    def cancel(self) -> None:
        """Stop the engine request (the replica aborts it and frees its blocks)."""
        if self._is_cancelled:
            return
        self._is_cancelled = True
        self._hub._forget(self)
        with contextlib.suppress(Exception):
            self._call.cancel()
        self.inbox.close()  # a reader still waiting on it ends too


class ChannelHub:
    """The ingress end: starts engine requests and reads one channel per engine replica they land on."""

    def __init__(self, replica: DeploymentHandle, ingress_id: str | None = None,
                 on_message: Callable[[int, float], None] | None = None,
                 wall_clock: Callable[[], float] = time.time, transport: str = "socket", node_ip: str = "") -> None:
        self.replica = replica
        self.ingress_id = ingress_id or f"ingress-{uuid.uuid4().hex[:12]}"
        # "socket": each replica's channel over a TCP connection of its own (serve_app/channel_socket.py), falling
        # back to the Ray call for a replica it cannot reach; "ray": the Ray call always.
        if transport not in ("socket", "ray"):
            raise ValueError(f"transport must be 'socket' or 'ray', got {transport!r}")
        self.transport = transport
        self.node_ip = node_ip
        # Replicas whose socket could not be reached, and when: their channels go through Ray for
        # `SOCKET_RETRY_S` (a brief failure does not keep a replica on the slower path for good).
        self._ray_only: dict[str, float] = {}
        self._clock = time.monotonic
        # Called with each channel message's number of items and its transit in seconds (metrics).
        self.on_message = on_message
        self._wall_clock = wall_clock
        self._calls: dict[str, ChanneledCall] = {}
        self._on_replica: dict[str, set[str]] = {}  # replica id -> ids of its requests from this ingress
        self._channels: dict[str, asyncio.Task] = {}
        self.num_messages = 0

    def start(self, request: GenerateRequest) -> ChanneledCall:
        """Send one engine request; its deltas will come through the channel of the replica it lands on."""
        request = dataclasses.replace(request, reply_to=self.ingress_id)
        # Registered before this returns to the event loop, so before any delta of it can arrive.
        call = ChanneledCall(self, request.request_id, self._remote("submit", request, request.request_id))
        self._calls[request.request_id] = call
        return call

    def _remote(self, method: str, message: Any, internal_request_id: str, stream: bool = True) -> Any:
        """A call (streaming unless `stream` is False), keyed for Ray's router bookkeeping (`on_request_completed`)
        by an id of its own: every call made while serving one HTTP request shares the caller's id, and the
        router's block reservations must never collide."""

        def call() -> Any:
            current = serve_context._get_serve_request_context()
            if current is not None:
                serve_context._serve_request_context.set(
                    dataclasses.replace(current, _internal_request_id=internal_request_id))
            return getattr(self.replica.options(stream=stream), method).remote(message)

        return contextvars.copy_context().run(call)

    def _accepted(self, call: ChanneledCall) -> None:
        replica_id = call.replica_id
        if call.request_id not in self._calls:
            return  # cancelled meanwhile
        self._on_replica.setdefault(replica_id, set()).add(call.request_id)
        if replica_id not in self._channels:
            self._channels[replica_id] = asyncio.get_running_loop().create_task(self._read_channel(replica_id))

    def _forget(self, call: ChanneledCall) -> None:
        if self._calls.get(call.request_id) is call:
            del self._calls[call.request_id]
        if call.replica_id is not None:
            self._on_replica.get(call.replica_id, set()).discard(call.request_id)

    async def _messages(self, replica_id: str) -> AsyncIterator[ChannelMessage]:
        """One replica's channel messages until it ends the channel (idle); raises if the channel is lost."""
        opening = ChannelOpen(self.ingress_id, replica_id, self.node_ip)
        call_id = f"channel-{self.ingress_id}-{replica_id}"
        # Calls made outside any HTTP request's context: the channel outlives them all, and Serve cancels the
        # calls an HTTP request made when its client disconnects.
        failed_at = self._ray_only.get(replica_id)
        if self.transport == "socket" and (failed_at is None or self._clock() - failed_at > SOCKET_RETRY_S):
            address = await contextvars.Context().run(self._remote, "channel_address", opening, call_id, False)
            connection = await self._connect(replica_id, address)
            if connection is not None:
                self._ray_only.pop(replica_id, None)
                async for message in channel_socket.read_messages(*connection):
                    yield message
                return
            self._ray_only[replica_id] = self._clock()
        stream = contextvars.Context().run(self._remote, "channel", opening, call_id)
        try:
            async for message in stream:
                yield message
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                stream.cancel()
            raise

    async def _connect(self, replica_id: str, address: channel_socket.ChannelAddress | None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The replica's channel connection, or None (logged) where it cannot listen for us or we cannot connect."""
        if address is None:
            logger.warning("stream channel of replica %s: it cannot listen for this node; its messages come through "
                           "Ray instead", replica_id)
            return None
        try:
            return await channel_socket.connect(address, self.ingress_id)
        except (OSError, TimeoutError) as exc:
            logger.warning("stream channel of replica %s: no connection to %s:%d (%s: %s); its messages come "
                           "through Ray instead", replica_id, address.host, address.port, type(exc).__name__, exc)
            return None

    async def _read_channel(self, replica_id: str) -> None:
        reason: BaseException | None = None  # None: the replica ended the channel (it was idle)
        try:
            async for message in self._messages(replica_id):
                self.num_messages += 1
                if self.on_message is not None:
                    # Clocks of two processes: clamped, as one a little behind the other would give a negative.
                    self.on_message(len(message.items), max(0.0, self._wall_clock() - message.sent_at_s))
                for request_id, item in message.items:
                    call = self._calls.get(request_id)
                    if call is not None:
                        call.inbox.put(item)
        except Exception as exc:  # noqa: BLE001 - every request on that replica learns it below
            reason = ChannelLostError(f"the stream channel from replica {replica_id} failed: "
                                      f"{type(exc).__name__}: {exc}")
            reason.__cause__ = exc
        finally:
            if self._channels.get(replica_id) is asyncio.current_task():
                del self._channels[replica_id]
        orphans = self._on_replica.pop(replica_id, set())
        if reason is None:
            # The replica closed an idle channel: every request of ours it held had ended then, and their
            # items came before the end. A request that landed there since waits for its items: reopen.
            waiting = {request_id for request_id in orphans
                       if (call := self._calls.get(request_id)) is not None and not call.inbox.is_closed}
            if waiting:
                self._on_replica[replica_id] = waiting
                if replica_id not in self._channels:
                    self._channels[replica_id] = asyncio.get_running_loop().create_task(
                        self._read_channel(replica_id))
            return
        # The replica (or the way to it) is gone: its requests go on elsewhere; a request that lands on it
        # later opens a new channel.
        if orphans:
            logger.warning("%s; %d requests of this ingress were on it", reason, len(orphans))
        for request_id in orphans:
            call = self._calls.get(request_id)
            if call is not None:
                call.inbox.put(reason)

    def close(self) -> None:
        for task in list(self._channels.values()):
            task.cancel()
        self._channels.clear()
