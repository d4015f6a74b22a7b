"""A clock that moves only when a test moves it: the `clock` argument of the plain-Python parts of serve_app
(buckets, shares, pacing, routing), in seconds."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
