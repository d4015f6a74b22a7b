"""How late an event loop runs what is due: a replica's responsiveness, sampled.

Every streamed token passes through the engine replica's event loop and then the ingress's; whatever holds
one of them (a long synchronous call, a burst of work, a process starved of CPU) delays every stream there at
once, which is what the tail of inter-token latency is made of. `watch_loop_lag` sleeps `interval_s` at a time
and reports how much later than asked each wake-up came: near zero on a responsive loop, the length of the
hold on a held one. A wake-up costs a few microseconds, so sampling every 20 ms costs nothing noticeable and
catches any hold of 20 ms or more, and a share of the shorter ones in proportion to their length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

LOOP_LAG_INTERVAL_S = 0.02


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = LOOP_LAG_INTERVAL_S,
                         clock: Callable[[], float] = time.monotonic) -> None:
    """Until cancelled: `observe(seconds late)` after every sleep of `interval_s` on the running loop."""
    while True:
        started_s = clock()
        await asyncio.sleep(interval_s)
        observe(max(0.0, clock() - started_s - interval_s))
