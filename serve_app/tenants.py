"""API keys as tenants: who a request is (the bearer token, compared in constant time) and whether its key's
limits let it in now (token buckets for requests per second and tokens per minute).

Plain Python, no HTTP and no Ray: the ingress asks `Tenants.identify` for the caller's `Tenant`, then
`Tenant.admit` before it sends anything to a replica, and `Tenant.charge_output` with the tokens generated
once the response ends. A refusal is `RateLimitedError` with the seconds after which the same request would
pass; the ingress answers it with 429 and `Retry-After`. The key's *name* is what metrics and logs carry.

Token accounting: a request's prompt tokens are taken when it is admitted (it needs that many in the bucket,
so a key over its budget waits until the bucket refills); its output tokens are taken when it ends, so the
bucket may go below zero after a long answer and the key's next request waits for the refill. `max_tokens`
is not charged up front: a request is never refused for what it might generate.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

ANONYMOUS = "anonymous"  # the tenant of every request when no API key is configured


class RateLimitedError(Exception):
    """A key's limit refuses the request now; the same request would pass after `retry_after_s`."""

    def __init__(self, message: str, limit: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit  # "requests_per_s" or "tokens_per_min"
        self.retry_after_s = retry_after_s


class NotAuthenticatedError(Exception):
    """No key, or a key that no tenant has."""


class TokenBucket:
    """`rate_per_s` units a second flow in, up to `capacity`; taking may drive the level below zero
    (`force`), which later takers then wait out. Starts full."""

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError(f"rate_per_s ({rate_per_s}) and capacity ({capacity}) must be positive")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._level = capacity
        self._updated_s = clock()

    @property
    def level(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated_s) * self.rate_per_s)
        self._updated_s = now
        return self._level

    def seconds_until(self, amount: float) -> float:
        """How long until `amount` can be taken (0: now); `math.inf` if more than the capacity."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate_per_s)

    def try_take(self, amount: float) -> bool:
        if self.level < amount:
            return False
        self._level -= amount
        return True

    def force_take(self, amount: float) -> None:
        """Take what was used, even below zero (output tokens already generated)."""
        self._level = self.level - amount


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits; None: unlimited."""

    requests_per_s: float | None = None
    tokens_per_min: float | None = None


class Tenant:
    """One API key's name and buckets. Requests may burst to one second's worth (at least 1); tokens to one
    minute's worth, as OpenAI's per-minute limits do."""

    def __init__(self, name: str, limits: KeyLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.limits = limits
        self.requests = None if limits.requests_per_s is None else TokenBucket(
            limits.requests_per_s, max(1.0, limits.requests_per_s), clock)
        self.tokens = None if limits.tokens_per_min is None else TokenBucket(
            limits.tokens_per_min / 60.0, limits.tokens_per_min, clock)

    def admit_request(self) -> None:
        """Take one request from the requests bucket, or raise `RateLimitedError`."""
        if self.requests is not None and not self.requests.try_take(1):
            raise RateLimitedError(
                f"API key '{self.name}' is over its limit of {self.limits.requests_per_s:g} requests/s",
                "requests_per_s", _whole_seconds(self.requests.seconds_until(1)))

    def admit_tokens(self, num_prompt_tokens: int) -> None:
        """Take the prompt's tokens from the tokens bucket, or raise `RateLimitedError` (`ValueError` if the
        prompt alone is over the key's whole per-minute budget: no wait would let it in)."""
        if self.tokens is None:
            return
        if num_prompt_tokens > self.tokens.capacity:
            raise ValueError(f"the prompt's {num_prompt_tokens} tokens are more than API key '{self.name}' may "
                             f"use in a minute ({self.limits.tokens_per_min:g})")
        if not self.tokens.try_take(num_prompt_tokens):
            raise RateLimitedError(
                f"API key '{self.name}' is over its limit of {self.limits.tokens_per_min:g} tokens/min",
                "tokens_per_min", _whole_seconds(self.tokens.seconds_until(num_prompt_tokens)))

    def charge_output(self, num_tokens: int) -> None:
        if self.tokens is not None and num_tokens > 0:
            self.tokens.force_take(num_tokens)


def _whole_seconds(seconds: float) -> int:
    """Retry-After is whole seconds: round up, at least 1."""
    return max(1, math.ceil(seconds))


class Tenants:
    """Bearer token -> `Tenant`. Without keys every request is the unlimited tenant `anonymous`."""

    def __init__(self, keys: list[tuple[str, str, KeyLimits]], clock: Callable[[], float] = time.monotonic) -> None:
        """`keys`: (name, key, limits) each; names and keys are unique (config/serve.py checks)."""
        self._by_key = [(key.encode(), Tenant(name, limits, clock)) for name, key, limits in keys]
        self.anonymous = Tenant(ANONYMOUS, KeyLimits(), clock)

    @property
    def is_open(self) -> bool:
        """No key configured: no authentication."""
        return not self._by_key

    @property
    def names(self) -> list[str]:
        return [tenant.name for _, tenant in self._by_key] or [ANONYMOUS]

    def identify(self, authorization: str) -> Tenant:
        """The tenant of an `Authorization` header value; `NotAuthenticatedError` if none matches. Every key
        is compared (in constant time), so the time taken says nothing about which one came close."""
        if self.is_open:
            return self.anonymous
        scheme, _, token = authorization.partition(" ")
        offered = token.strip().encode()
        found = None
        for key, tenant in self._by_key:
            if hmac.compare_digest(offered, key) and scheme.lower() == "bearer":
                found = tenant
        if found is None:
            raise NotAuthenticatedError("invalid or missing API key (Authorization: Bearer <key>)")
        return found
