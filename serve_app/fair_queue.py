"""Fair admission across API keys, in front of the router: what one ingress replica hands to Ray Serve's router.

Ray Serve's router takes the requests of a handle in arrival order (a FIFO line), and while no replica has
room they wait in that line (serve_app/router.py). A key that floods the service would fill the line, and
every other key's request would wait behind all of it. So the ingress hands the router at most
`max_routing_per_key` requests of each key at once (sent, not yet accepted by a replica); the others wait
here, each key's in arrival order, and the next of a key goes when one of its own is accepted. The router's
line then holds at most that many of any key: a newcomer waits behind at most `max_routing_per_key` requests
of each other key, whatever they sent, and keys take turns as their requests are placed (round-robin; with
one request each, exactly). Below saturation requests are accepted within milliseconds and nothing waits.

The waiting here counts as the router's queue: at most `max_queued_requests` wait in all (those turned back
below included), each at most `queue_timeout_s`; past either, `ServiceOverloadedError` (429 with
Retry-After), as the router refuses.

A request the router turns back because no replica has room its key may take besides what the key already
holds (`KeyOverShareError`: other keys are owed the rest, serve_app/key_shares.py) keeps its place here and is
sent again when a request of its key ends, or after `share_retry_s` (the replicas' report period: the
router's view of their room is renewed), within its `queue_timeout_s`. So such a key waits here, behind
itself, and not in the router's line, where it would hold up other keys' requests that have room.

`FairAdmission` wraps the ingress's `ChannelHub` (serve_app/stream_channel.py) with a `FairQueue`: its calls
enter the queue on their first read, and leave it once accepted by a replica, or on failure or cancellation.
Plain asyncio; no Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from pagedserve.engine.core.request import RequestOutput
from pagedserve.serve_app.errors import KeyOverShareError, ServiceOverloadedError
from pagedserve.serve_app.messages import GenerateRequest


class FairQueue:
    """Per-key bound on requests with the router, and the per-key FIFO lines of those waiting for it."""

    def __init__(self, max_routing_per_key: int, max_waiting: int, timeout_s: float, retry_after_s: int,
                 share_retry_s: float = 1.0) -> None:
        if max_routing_per_key < 1:
            raise ValueError(f"max_routing_per_key must be >= 1, got {max_routing_per_key}")
        self.max_routing_per_key = max_routing_per_key
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.share_retry_s = share_retry_s
        self._routing: dict[str, int] = {}
        self._waiting: dict[str, deque[asyncio.Future]] = {}
        self._num_waiting = 0
        self._num_over_share = 0
        self._request_ended: dict[str, asyncio.Event] = {}  # per key, set (and replaced) when one of its requests ends

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def _full(self) -> ServiceOverloadedError:
        return ServiceOverloadedError(f"all replicas are busy and {self.max_waiting} requests are already waiting",
                                      self.retry_after_s)

    @property
    def num_held(self) -> int:
        """Requests held here, not with the router: waiting for a place, or turned back over their key's share
        (what the autoscaler adds to the handles' queues, serve_app/autoscaling.py)."""
        return self._num_waiting + self._num_over_share

    def request_ended(self, key: str) -> None:
        """A request of `key` that a replica accepted has ended: its key's share may have room again."""
        event = self._request_ended.pop(key, None)
        if event is not None:
            event.set()

    async def wait_for_share(self, key: str, deadline_s: float) -> None:
        """A request of `key` was turned back over its key's share: return when one of its key's requests ends
        or after `share_retry_s`; `ServiceOverloadedError` once the loop's clock passes `deadline_s`."""
        loop = asyncio.get_running_loop()
        left_s = deadline_s - loop.time()
        if left_s <= 0:
            raise ServiceOverloadedError(f"no replica had room within {self.timeout_s:g}s", self.retry_after_s)
        if self.num_held >= self.max_waiting:  # turned back, it waits as those in the lines do: within the bound
            raise self._full()
        event = self._request_ended.setdefault(key, asyncio.Event())
        self._num_over_share += 1
        try:
            await asyncio.wait_for(event.wait(), min(self.share_retry_s, left_s))
        except asyncio.TimeoutError:
            pass
        finally:
            self._num_over_share -= 1

    def num_routing(self, key: str) -> int:
        return self._routing.get(key, 0)

    async def enter(self, key: str) -> None:
        """Return once a request of `key` may go to the router (then call `leave(key)` exactly once)."""
        if self.num_routing(key) < self.max_routing_per_key and not self._waiting.get(key):
            self._routing[key] = self.num_routing(key) + 1
            return
        if self.num_held >= self.max_waiting:
            raise self._full()
        granted = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(granted)
        self._num_waiting += 1
        try:
            await asyncio.wait_for(asyncio.shield(granted), self.timeout_s)
        except asyncio.TimeoutError:
            if not self._forget(key, granted):  # granted just as the wait ran out: take it
                return
            raise ServiceOverloadedError(f"no replica had room within {self.timeout_s:g}s",
                                         self.retry_after_s) from None
        except asyncio.CancelledError:
            if not self._forget(key, granted):
                self.leave(key)  # granted, but its caller is gone: hand the place on
            raise

    def _forget(self, key: str, granted: asyncio.Future) -> bool:
        """Take a waiter out of its line; False if it was granted meanwhile (it holds a place)."""
        if granted.done():
            return False
        granted.cancel()
        line = self._waiting.get(key)
        if line is not None and granted in line:
            line.remove(granted)
            self._num_waiting -= 1
            if not line:
                del self._waiting[key]
        return True

    def leave(self, key: str) -> None:
        """A request of `key` was accepted by a replica, failed or was cancelled: the next of `key` may go."""
        self._routing[key] = self.num_routing(key) - 1
        line = self._waiting.get(key)
        while line and self._routing[key] < self.max_routing_per_key:
            granted = line.popleft()
            self._num_waiting -= 1
            if not granted.done():
                self._routing[key] += 1
                granted.set_result(None)
        if line is not None and not line:
            del self._waiting[key]
        if self._routing[key] == 0:
            del self._routing[key]


class _QueuedCall:
    """One engine request behind the queue: an async iterator of its items with `cancel()`, as the hub's."""

    def __init__(self, admission: "FairAdmission", request: GenerateRequest) -> None:
        self._admission = admission
        self._request = request
        self._call: Any = None
        self._holds_place = False
        self._is_cancelled = False
        self._is_accepted = False
        self._has_ended = False

    def __aiter__(self) -> "_QueuedCall":
        return self

    async def __anext__(self) -> Any:
        if self._call is None:
            return await self._first()
        try:
            item = await self._call.__anext__()
        except BaseException:
            self._ended()
            raise
        if not isinstance(item, RequestOutput) or item.finished:
            self._ended()
        return item

    async def _first(self) -> Any:
        """Wait for a place, send, and send again while the router turns it back over its key's share."""
        if self._is_cancelled:
            raise StopAsyncIteration
        queue, key = self._admission.queue, self._request.api_key_name
        deadline_s = asyncio.get_running_loop().time() + queue.timeout_s
        await queue.enter(key)
        self._holds_place = True
        try:
            for attempt in itertools.count():
                if self._is_cancelled:  # cancelled while it waited
                    raise StopAsyncIteration
                # Counted without this request: it leaves as it is sent (serve_app/autoscaling.py reads it). A new
                # id per attempt: Ray's router and its block reservations key requests by it.
                request = dataclasses.replace(self._request, num_held_by_ingress=queue.num_held)
                if attempt > 0:
                    request = dataclasses.replace(request, request_id=f"{request.request_id}-share{attempt}")
                self._call = self._admission.requests.start(request)
                self._call.on_accepted = self._accepted
                try:
                    item = await self._call.__anext__()
                except Exception as exc:  # noqa: BLE001 - only the over-share refusal is ours to handle
                    if self._is_accepted or not _is_over_share(exc):
                        self._ended()
                        raise
                    self._call.cancel()  # routing failed: nothing runs; the hub forgets the call
                    if self._admission.on_turned_back is not None:
                        self._admission.on_turned_back(key)
                else:
                    if not isinstance(item, RequestOutput) or item.finished:
                        self._ended()
                    return item
                await queue.wait_for_share(key, deadline_s)
        finally:
            self._release()  # refused, failed or ended before acceptance: no-op once accepted

    def _accepted(self) -> None:
        self._is_accepted = True
        self._release()

    def _ended(self) -> None:
        if self._is_accepted and not self._has_ended:
            self._has_ended = True
            self._admission.queue.request_ended(self._request.api_key_name)

    def _release(self) -> None:
        if self._holds_place:
            self._holds_place = False
            self._admission.queue.leave(self._request.api_key_name)

    def cancel(self) -> None:
        self._is_cancelled = True
        self._release()
        self._ended()
        if self._call is not None:
            self._call.cancel()


def _is_over_share(error: BaseException) -> bool:
    """The router's over-share refusal, as raised in this process or wrapped by Ray."""
    for _ in range(5):
        if isinstance(error, KeyOverShareError):
            return True
        cause = getattr(error, "cause", None) or error.__cause__
        if cause is None:
            return False
        error = cause
    return False


class FairAdmission:
    """Starts engine requests through a `FairQueue` (an `EngineRequests` for serve_app/replica_calls.py);
    `on_turned_back(key)` is called for each send turned back over its key's share (a metric)."""

    def __init__(self, requests: Any, queue: FairQueue, on_turned_back: Callable[[str], None] | None = None) -> None:
        self.requests = requests  # the ChannelHub
        self.queue = queue
        self.on_turned_back = on_turned_back

    def start(self, request: GenerateRequest) -> _QueuedCall:
        return _QueuedCall(self, request)
