"""Each API key's share of a replica's KV blocks, for the router: while several keys use the service, none
takes the room another one is owed.

Fair admission (serve_app/fair_queue.py) orders who gets room; it does not make room. A key flooding the
service within its limits fills the replicas with its requests, and another key's request then waits for
one of them to end: a long answer's whole length. So the router keeps, on every replica, room for each
*other* active key: its max-min fair share of the replica's blocks (water-filling over the keys' recent peak
demand, so a light key is owed what it used and the heavy keys split the rest evenly), less what it holds
there now. A request may take a replica's room only down to what the other keys are owed there. Within its
own key's share a request leaves only what lighter keys (or as heavy) are owed: room kept for a heavier key
is what that key may still grow into, and a light key that stays within its share leaves enough of it (the
router's view of free blocks errs low, so keeping a light key from that room would make it wait for the
heavy key's reservations to clear). A key holding nothing on a replica may always start one request there,
so a request larger than its key's share still runs. With one key active nothing is held back, so one key
alone uses every block (work-conserving).

Every ingress replica has its own router, and the accounting is service-wide, whichever ingress sent a key's
requests: what a key holds on a replica is the blocks the replica reports for it plus the router's own
requests of it that no report counts yet (serve_app/router.py); its demand is what it holds on all replicas,
plus the request being routed. A key's demand is noted at each of its requests the router routes and at
each replica report that shows it holding blocks, so a key is active in every ingress; it stops being owed
anything `window_s` after the last of those.

Plain Python, no Ray: the router feeds demands and asks what is owed; the clock comes from the caller.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Mapping


class RecentPeak:
    """The largest value added within the last `window_s` (a monotonic deque: O(1) amortized per call)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()  # (time, value), values strictly decreasing

    def add(self, now_s: float, value: int) -> None:
        while self._samples and self._samples[-1][1] <= value:
            self._samples.pop()
        self._samples.append((now_s, value))

    def value(self, now_s: float) -> int:
        while self._samples and self._samples[0][0] < now_s - self.window_s:
            self._samples.popleft()
        return self._samples[0][1] if self._samples else 0


def max_min_shares(num_blocks: int, demands: Mapping[str, int]) -> dict[str, int]:
    """Water-filling: keys in order of demand each get min(demand, an even split of what is left), in whole
    blocks (rounded down, so the shares never add up to more than `num_blocks`)."""
    shares: dict[str, int] = {}
    left = num_blocks
    ordered = sorted(demands, key=lambda key: demands[key])
    for index, key in enumerate(ordered):
        share = min(demands[key], math.floor(left / (len(ordered) - index)))
        shares[key] = share
        left -= share
    return shares


class KeyShares:
    """Recent peak demand per API key, and what a request of one key must leave on a replica for the others."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self.window_s = window_s
        self._clock = clock
        self._peaks: dict[str, RecentPeak] = {}

    def note_demand(self, key: str, num_blocks: int) -> None:
        """`key` wants `num_blocks` in all now: what it holds on all replicas (plus the request being routed,
        if any)."""
        self._peaks.setdefault(key, RecentPeak(self.window_s)).add(self._clock(), num_blocks)

    def active_demands(self) -> dict[str, int]:
        """Peak demand of every key that asked for blocks within the window (keys past it are forgotten)."""
        now = self._clock()
        demands = {key: peak.value(now) for key, peak in self._peaks.items()}
        for key in [key for key, demand in demands.items() if demand == 0]:
            del self._peaks[key], demands[key]
        return demands

    def owed_to_others(self, key: str, num_blocks: int, num_total_blocks: int, held: Mapping[str, int],
                       demands: Mapping[str, int] | None = None) -> int:
        """`owed_to_others` below, with this router's active demands unless given."""
        return owed_to_others(key, num_blocks, num_total_blocks, held,
                              self.active_demands() if demands is None else demands)


def owed_to_others(key: str, num_blocks: int, num_total_blocks: int, held: Mapping[str, int],
                   demands: Mapping[str, int]) -> int:
    """Blocks of a replica of `num_total_blocks` that a request of `key` for `num_blocks` must leave free: each
    other active key's fair share there (over the keys' peak `demands`) less what it `held` there; while the
    request keeps `key` within its own share, only what keys no heavier than `key` are owed. 0 when `key` holds
    nothing there (one request of every key may always start) or no other key is active."""
    own = held.get(key, 0)
    if own == 0 or len(demands.keys() - {key}) == 0:
        return 0
    shares = max_min_shares(num_total_blocks, {k: min(d, num_total_blocks) for k, d in demands.items()})
    is_within_share = own + num_blocks <= shares.get(key, 0)
    own_demand = demands.get(key, 0)
    return sum(max(0, share - held.get(other, 0)) for other, share in shares.items()
               if other != key and (not is_within_share or demands[other] <= own_demand))


class CommittedBlocks:
    """An engine replica's worst-case blocks (prompt + n * max_tokens) of every request it holds, with each API
    key's total and that total's peak within the last `window_s`: what the key wanted here lately. Replicas report
    both, so every router weighs a key by what it holds and wants service-wide, whichever ingress its requests
    came through; a short request that ends between two reports still shows in the peak (window_s 0: no peaks)."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self.window_s = window_s
        # Requests come and go on the replica's event loop while Serve reads the routing stats in its thread pool.
        self._lock = threading.Lock()
        self._by_request: dict[str, tuple[str, int]] = {}
        self._by_key: dict[str, int] = {}
        self._peaks = KeyShares(window_s, clock)  # each key's totals as demands: their peaks within the window
        self.total = 0

    def add(self, request_id: str, key: str, num_blocks: int) -> None:
        with self._lock:
            self._remove(request_id)
            self._by_request[request_id] = (key, num_blocks)
            self._by_key[key] = self._by_key.get(key, 0) + num_blocks
            self.total += num_blocks
            if self.window_s > 0 and num_blocks > 0:
                self._peaks.note_demand(key, self._by_key[key])

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._remove(request_id)

    def _remove(self, request_id: str) -> None:
        key, num_blocks = self._by_request.pop(request_id, (None, 0))
        if key is None:
            return
        self._by_key[key] -= num_blocks
        self.total -= num_blocks
        if self._by_key[key] == 0:
            del self._by_key[key]

    def leaves_others_room(self, key: str, num_blocks: int, num_total_blocks: int) -> bool:
        """Whether a request of `key` for `num_blocks` fits here beside what the other keys active here within the
        window are owed (`owed_to_others` over the keys' recent peaks here), as the routers' rule has it: the
        replica's own check, exact where the routers' is not (each router adds only its own requests to the
        replicas' last reports, so several ingresses may together send a key past its share, or past the room,
        within one report period). A request that does not fit would wait in the engine and take the next
        blocks freed, ahead of the other keys' next requests; turned back, it waits in its ingress's fair
        queue instead. A key that holds nothing here, or the only key active here, always fits: the engine
        queues or preempts as it would without keys."""
        with self._lock:
            if self._by_key.get(key, 0) == 0:
                return True
            demands = self._peaks.active_demands()
            demands[key] = max(demands.get(key, 0), self._by_key[key] + num_blocks)
            if len(demands) < 2:
                return True
            owed = owed_to_others(key, num_blocks, num_total_blocks, self._by_key, demands)
            return num_total_blocks - self.total - num_blocks >= owed

    def by_key(self) -> dict[str, int]:
        """Each key's blocks now (keys with none absent)."""
        with self._lock:
            return {key: blocks for key, blocks in self._by_key.items() if blocks > 0}

    def peak_by_key(self) -> dict[str, int]:
        """Each key's largest total within the window (keys past it are forgotten)."""
        with self._lock:
            return self._peaks.active_demands()

