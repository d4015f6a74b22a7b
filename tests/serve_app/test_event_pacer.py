"""serve_app/event_pacer.py on a hand-moved clock: within the budget nothing waits, past it the events are
spread to the budget's rate."""

from __future__ import annotations

import pytest

from pagedserve.serve_app.event_pacer import HAPROXY_EVENTS_PER_S, PROXY_EVENTS_PER_S, EventPacer, default_events_per_s
from fake_clock import FakeClock  # beside this file (conftest puts the folder on sys.path)


def test_below_the_budget_every_step_goes_out_at_once() -> None:
    clock = FakeClock()
    pacer = EventPacer(1000.0, burst_s=0.05, clock=clock)
    for _ in range(200):  # 40 streams, a step every 50 ms: 800 events a second
        assert all(pacer.book() == 0.0 for _ in range(40))
        clock.now += 0.05


def test_past_the_budget_events_wait_for_their_turn() -> None:
    clock = FakeClock()
    pacer = EventPacer(1000.0, burst_s=0.05, clock=clock)
    waits = [pacer.book() for _ in range(200)]  # 200 streams at once
    assert waits[:51] == pytest.approx([0.0] * 51, abs=1e-9)  # the burst
    assert waits[51] == pytest.approx(0.001)
    assert waits[-1] == pytest.approx(0.199 - 0.05)
    # Whoever books next waits behind them all: 200 events took the budget's 0.2 s.
    clock.now += 0.1
    assert pacer.book() == pytest.approx(0.2 - 0.1 - 0.05)


def test_an_idle_budget_does_not_save_up_more_than_the_burst() -> None:
    clock = FakeClock()
    pacer = EventPacer(100.0, burst_s=0.05, clock=clock)
    clock.now += 60
    waits = [pacer.book() for _ in range(10)]
    assert waits[:6] == pytest.approx([0.0] * 6, abs=1e-9) and waits[6] == pytest.approx(0.01)


def test_the_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="events_per_s"):
        EventPacer(0.0)


def test_the_default_budget_follows_the_path_the_events_take():
    # Serve's Python proxy carries them unless Ray's HAProxy ingress is on (Ray's own test: exactly "1").
    assert default_events_per_s({}) == PROXY_EVENTS_PER_S == 1000.0
    assert default_events_per_s({"RAY_SERVE_ENABLE_HA_PROXY": "0"}) == PROXY_EVENTS_PER_S
    assert default_events_per_s({"RAY_SERVE_ENABLE_HA_PROXY": "true"}) == PROXY_EVENTS_PER_S
    assert default_events_per_s({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}) == PROXY_EVENTS_PER_S
    assert default_events_per_s({"RAY_SERVE_ENABLE_HA_PROXY": "1"}) == HAPROXY_EVENTS_PER_S == 3000.0
