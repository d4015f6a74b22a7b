"""One ingress replica's budget of server-sent events a second, over all its streams.

Each event costs the ingress and Serve's HTTP proxy CPU whatever it holds, and the proxy carries every
ingress replica's events of its node (docs/deploy.md), so past some rate more events slow everything. The
pacer is a virtual schedule (GCRA, the token bucket as a time): each event books the next slot `1 / events_per_s`
after the last one booked, and a stream waits only when its slot is more than `burst_s` ahead of now. Below
the budget nothing waits, and one engine step's tokens for every stream go out at once (a burst of up to
`burst_s` worth of events); past it, the streams share the budget in turn, each waiting about
`open streams / events_per_s`, and the tokens that arrive meanwhile go out together as one event.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

# A burst that goes out without waiting: a few engine steps of every stream at the budget's rate.
BURST_S = 0.05

# Events a second one ingress replica writes by default: through Serve's Python proxy (chosen on one H200 with
# 4 ingress replicas, burst throughput beside steady-load gaps), and under Ray's HAProxy ingress, where an event
# costs the ingress and HAProxy 3.3-4.5x less CPU than the ingress and the proxy (docs/deploy.md).
PROXY_EVENTS_PER_S = 1000.0
HAPROXY_EVENTS_PER_S = 3000.0


def default_events_per_s(environ: Mapping[str, str] = os.environ) -> float:
    """`max_stream_events_per_s` when the config leaves it unset: by how the streams leave this process. Ray reads
    `RAY_SERVE_ENABLE_HA_PROXY` the same way (exactly "1"); the variable is set on every node of a cluster that
    runs HAProxy, this replica's included. Direct ingress alone keeps the proxy's budget: requests to Serve's
    HTTP port still take the Python proxy."""
    return HAPROXY_EVENTS_PER_S if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1" else PROXY_EVENTS_PER_S


class EventPacer:
    """Not thread-safe: one event loop's streams share it."""

    def __init__(self, events_per_s: float, burst_s: float = BURST_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if events_per_s <= 0:
            raise ValueError(f"events_per_s must be > 0, got {events_per_s}")
        self.interval_s = 1.0 / events_per_s
        self.burst_s = max(burst_s, 0.0)
        self._clock = clock
        self._next_slot_s = float("-inf")  # the slot the next event books: the last booked + interval

    def book(self) -> float:
        """Book a slot for one event: seconds to wait before writing it (0.0 within the budget)."""
        now = self._clock()
        slot_s = max(self._next_slot_s, now)
        self._next_slot_s = slot_s + self.interval_s
        return max(0.0, slot_s - now - self.burst_s)
