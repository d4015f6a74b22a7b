"""serve_app/loop_lag.py: a loop's lateness, as the replicas' metrics record it."""

from __future__ import annotations

import asyncio
import time

from pagedserve.serve_app.loop_lag import watch_loop_lag


def _lags_while(work, interval_s: float = 0.005) -> list[float]:
    lags: list[float] = []

    async def run() -> None:
        watcher = asyncio.get_running_loop().create_task(watch_loop_lag(lags.append, interval_s))
        await asyncio.sleep(interval_s * 3)  # a few free wake-ups first
        await work()
        await asyncio.sleep(interval_s * 3)
        watcher.cancel()

    asyncio.run(run())
    return lags


def test_a_free_loop_is_barely_late_and_a_held_one_as_late_as_the_hold() -> None:
    async def free() -> None:
        await asyncio.sleep(0.02)

    async def held() -> None:
        time.sleep(0.08)  # a synchronous call on the loop: every task there waits it out

    free_lags = _lags_while(free)
    assert free_lags and all(lag >= 0.0 for lag in free_lags)
    held_lags = _lags_while(held)
    assert max(held_lags) >= 0.06, held_lags  # the hold, less the sleep it interrupted
    assert max(held_lags) > max(free_lags) + 0.03, (free_lags, held_lags)
