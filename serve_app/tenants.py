"""API keys as tenants: who a request is (the bearer token, compared in constant time) and whether its key's
limits let it in now (token buckets for requests per second and tokens per minute).

Plain Python, no HTTP and no Ray. The ingress asks `Tenants.identify` for the caller's `Tenant`; its limits are
then kept by one set of buckets for the whole service (serve_app/key_limiter.py: the buckets below, held by
one small deployment that every ingress replica asks), so a key gets its limits however many ingress replicas
its requests reach. `Tenant.admit` takes a request and its prompt tokens at once, or neither; a refusal is
`RateLimitedError` with the seconds after which the same request would pass, which the ingress answers with
429 and `Retry-After`. The key's *name* is what metrics and logs carry.

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
from typing import Protocol

ANONYMOUS = "anonymous"  # the tenant of every request when no API key is configured


class RateLimitedError(Exception):
    """A key's limit refuses the request now; the same request would pass after `retry_after_s`."""

    def __init__(self, message: str, limit: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit  # "requests_per_s" or "tokens_per_min"
        self.retry_after_s = retry_after_s


class PromptOverBudgetError(ValueError):
    """A prompt larger than its key's whole `tokens_per_min`: no wait would let it in (429 without Retry-After)."""


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

    @property
    def is_limited(self) -> bool:
        return self.requests is not None or self.tokens is not None

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """`PromptOverBudgetError` if the prompt alone is more than the key may use in a minute: no wait would
        let it in."""
        if self.limits.tokens_per_min is not None and num_prompt_tokens > self.limits.tokens_per_min:
            raise PromptOverBudgetError(
                f"the prompt's {num_prompt_tokens} tokens are more than API key '{self.name}' may use in a minute "
                f"({self.limits.tokens_per_min:g})")

    def seconds_until_admitted(self, num_prompt_tokens: int) -> tuple[str | None, float]:
        """`limit_holding_back` over this tenant's buckets."""
        return limit_holding_back(self.requests, self.tokens, num_prompt_tokens)

    def admit(self, num_prompt_tokens: int) -> None:
        """Take one request and the prompt's tokens, both or neither: `RateLimitedError` if a bucket lacks them
        (`PromptOverBudgetError` if no wait would do)."""
        self.check_prompt(num_prompt_tokens)
        limit, wait_s = self.seconds_until_admitted(num_prompt_tokens)
        if limit is not None:
            raise self.refusal(limit, wait_s)
        self.take(num_prompt_tokens)

    def take(self, num_prompt_tokens: int) -> None:
        """Take one request and the prompt's tokens, already found admitted (`seconds_until_admitted`)."""
        if self.requests is not None:
            self.requests.force_take(1)
        if self.tokens is not None and num_prompt_tokens > 0:
            self.tokens.force_take(num_prompt_tokens)

    def refusal(self, limit: str, wait_s: float) -> "RateLimitedError":
        """The error for a request `limit` holds back for `wait_s` more seconds."""
        if limit == "requests_per_s":
            what = f"{self.limits.requests_per_s:g} requests/s"
        else:
            what = f"{self.limits.tokens_per_min:g} tokens/min"
        return RateLimitedError(f"API key '{self.name}' is over its limit of {what}", limit, _whole_seconds(wait_s))

    def charge_output(self, num_tokens: int) -> None:
        if self.tokens is not None and num_tokens > 0:
            self.tokens.force_take(num_tokens)


class _Bucket(Protocol):
    def seconds_until(self, amount: float) -> float: ...


def limit_holding_back(requests: _Bucket | None, tokens: _Bucket | None,
                       num_prompt_tokens: int) -> tuple[str | None, float]:
    """(None, 0) if a request with this many prompt tokens may be admitted by these buckets (either None: no such
    limit) now; else the limit that holds it back and how long until it would not (the requests bucket first).
    The buckets are a tenant's own, or an ingress's bounds of the service's (serve_app/key_limiter.py)."""
    if requests is not None:
        wait_s = requests.seconds_until(1)
        if wait_s > 0:
            return "requests_per_s", wait_s
    if tokens is not None and num_prompt_tokens > 0:
        wait_s = tokens.seconds_until(num_prompt_tokens)
        if wait_s > 0:
            return "tokens_per_min", wait_s
    return None, 0.0


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

    def all(self) -> list[Tenant]:
        """Every configured key's tenant (none when the service is open)."""
        return [tenant for _, tenant in self._by_key]

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
