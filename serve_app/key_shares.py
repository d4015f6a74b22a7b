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
        """Blocks of a replica of `num_total_blocks` that a request of `key` for `num_blocks` must leave free:
        each other active key's fair share there less what it `held` there; while the request keeps `key`
        within its own share, only what keys no heavier than `key` are owed. 0 when `key` holds nothing there
        (one request of every key may always start) or no other key is active. `demands`: `active_demands()`,
        if already read."""
        own = held.get(key, 0)
        if own == 0:
            return 0
        demands = self.active_demands() if demands is None else demands
        if len(demands.keys() - {key}) == 0:
            return 0
        shares = max_min_shares(num_total_blocks, {k: min(d, num_total_blocks) for k, d in demands.items()})
        is_within_share = own + num_blocks <= shares.get(key, 0)
        own_demand = demands.get(key, 0)
        return sum(max(0, share - held.get(other, 0)) for other, share in shares.items()
                   if other != key and (not is_within_share or demands[other] <= own_demand))
