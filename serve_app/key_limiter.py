"""One set of per-key buckets for the whole service: what keeps an API key within its limits whichever ingress
replica its requests reach.

Every ingress replica admits requests on its own. With buckets of its own, a key would get N times its limits
from N ingress replicas (4 by default on GPU machines: `ingress_num_replicas`), and an ingress replica that
Serve replaced would start every key afresh. So the buckets (serve_app/tenants.py) live in one small
deployment, `KeyLimiter` (one replica, no CPU), bound into the application when some key has limits. An
ingress asks it once per request of a limited key (`admit`, with the prompt's tokens, after tokenizing) and
tells it each answer's output tokens (`charge`, not awaited). Keys without limits never call it.

A flood must not become a flood of calls: each answer carries the buckets' levels, and the ingress keeps, per
key, an upper bound of each level since (`BucketView`: the level plus what has flowed in since the call was
sent; other ingresses only ever take). A request that bound cannot pay is refused in the ingress without a
call, and rightly: the limiter would have refused it too. A key flooding at 10x its limit so costs about one
call per admitted request, not one per request sent.

If the limiter cannot be reached (Serve is replacing it; no answer within `LIMITER_TIMEOUT_S`), an ingress
admits by buckets of its own holding 1/N of each limit (N: the ingress replicas), says so once in its log, asks
the limiter again after `LIMITER_RETRY_S`, and goes back to it when it answers. A new limiter starts each key
with full buckets, as a deploy does; until an ingress hears from it, that ingress's bound may refuse a request
the new limiter would take (for at most one refill of the bucket).

`KeyLimiter` is a plain class (Serve wraps it as a deployment: serve_app/app.py) and `KeyBudgets` takes the
limiter's calls as functions, so tests drive both without Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from pagedserve.serve_app.tenants import KeyLimits, RateLimitedError, Tenant, TokenBucket, limit_holding_back

logger = logging.getLogger("ray.serve")

# An ingress waits this long for the limiter's answer before it admits by its own share of the limits.
LIMITER_TIMEOUT_S = 2.0
# Then for this long its requests do not ask the limiter (the next one after it does).
LIMITER_RETRY_S = 5.0


@dataclass(frozen=True)
class Verdict:
    """The limiter's answer: `limit` None if admitted (the request and its prompt tokens taken), else the limit
    that holds it back for `wait_s`; the levels of the key's buckets after the answer (None: no such limit)."""

    limit: str | None
    wait_s: float
    requests_level: float | None
    tokens_level: float | None


class KeyLimiter:
    """The service's buckets, by key name (the deployment every ingress replica asks)."""

    def __init__(self, limits: Mapping[str, KeyLimits], clock: Callable[[], float] = time.monotonic) -> None:
        self._tenants = {name: Tenant(name, key_limits, clock) for name, key_limits in limits.items()}

    # Both methods are coroutines with no await inside: Serve runs them on the replica's event loop one at a time,
    # so a check and its take are one step (Serve would run plain methods in a thread pool, side by side).

    async def admit(self, name: str, num_prompt_tokens: int) -> Verdict:
        """Take a request of key `name` and its prompt's tokens, or say which limit holds it back."""
        tenant = self._tenants[name]
        limit, wait_s = tenant.seconds_until_admitted(num_prompt_tokens)
        if limit is None:
            tenant.take(num_prompt_tokens)
        return self._verdict(tenant, limit, wait_s)

    async def charge(self, name: str, num_tokens: int) -> Verdict:
        """Take the output tokens of an answer of key `name` (the bucket may go below zero)."""
        tenant = self._tenants[name]
        tenant.charge_output(num_tokens)
        return self._verdict(tenant, None, 0.0)

    @staticmethod
    def _verdict(tenant: Tenant, limit: str | None, wait_s: float) -> Verdict:
        return Verdict(limit, wait_s, None if tenant.requests is None else tenant.requests.level,
                       None if tenant.tokens is None else tenant.tokens.level)


class BucketView:
    """An ingress's upper bound of one of the limiter's buckets: the level last heard of, plus what has flowed in
    since the call that heard it was sent (never above the capacity). Starts full."""

    def __init__(self, bucket: TokenBucket, clock: Callable[[], float]) -> None:
        self.rate_per_s = bucket.rate_per_s
        self.capacity = bucket.capacity
        self._clock = clock
        self._level = bucket.capacity
        self._as_of_s = clock()

    def heard(self, level: float, sent_s: float) -> None:
        """The limiter's level in an answer to a call sent at `sent_s` (the level was read after that)."""
        self._level, self._as_of_s = level, sent_s

    def seconds_until(self, amount: float) -> float:
        """How long at least until the limiter's bucket holds `amount` (0: it may now)."""
        bound = min(self.capacity, self._level + (self._clock() - self._as_of_s) * self.rate_per_s)
        return max(0.0, (amount - bound) / self.rate_per_s)


class _KeyState:
    """One limited key as one ingress sees it: bounds of the limiter's buckets, and the 1/N buckets it admits by
    while the limiter cannot be reached."""

    def __init__(self, tenant: Tenant, num_ingresses: int, clock: Callable[[], float]) -> None:
        self.tenant = tenant
        self.requests = None if tenant.requests is None else BucketView(tenant.requests, clock)
        self.tokens = None if tenant.tokens is None else BucketView(tenant.tokens, clock)
        limits = tenant.limits
        self.fallback = Tenant(tenant.name, KeyLimits(
            None if limits.requests_per_s is None else limits.requests_per_s / num_ingresses,
            None if limits.tokens_per_min is None else limits.tokens_per_min / num_ingresses), clock)

    def heard(self, verdict: Verdict, sent_s: float) -> None:
        if self.requests is not None and verdict.requests_level is not None:
            self.requests.heard(verdict.requests_level, sent_s)
        if self.tokens is not None and verdict.tokens_level is not None:
            self.tokens.heard(verdict.tokens_level, sent_s)

    def surely_refused(self, num_prompt_tokens: int) -> RateLimitedError | None:
        """The refusal the limiter would give now, if the bounds already tell (None: ask it)."""
        limit, wait_s = limit_holding_back(self.requests, self.tokens, num_prompt_tokens)
        return None if limit is None else self.tenant.refusal(limit, wait_s)


AdmitCall = Callable[[str, int], Awaitable[Verdict]]
ChargeCall = Callable[[str, int], object]


class KeyBudgets:
    """One ingress replica's admission of its requests against their keys' limits.

    With `admit_call`/`charge_call` (the limiter's `admit` and `charge`, through a deployment handle) the limits
    hold for the whole service; without them, each tenant's own buckets here do (one ingress, or tests)."""

    def __init__(self, tenants: Iterable[Tenant], admit_call: AdmitCall | None = None,
                 charge_call: ChargeCall | None = None, num_ingresses: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._admit_call = admit_call
        self._charge_call = charge_call
        self._clock = clock
        self._keys = {tenant.name: _KeyState(tenant, max(1, num_ingresses), clock)
                      for tenant in tenants if tenant.is_limited}
        self._is_limiter_lost = False
        self._retry_limiter_at_s = 0.0

    @property
    def is_shared(self) -> bool:
        return self._admit_call is not None

    def check_arrival(self, tenant: Tenant) -> None:
        """`RateLimitedError` if the key surely cannot spend a request (of at least one prompt token) now: refused
        before its body is read."""
        if not tenant.is_limited:
            return
        if self.is_shared:
            refusal = self._keys[tenant.name].surely_refused(1)
        else:
            limit, wait_s = tenant.seconds_until_admitted(1)
            refusal = None if limit is None else tenant.refusal(limit, wait_s)
        if refusal is not None:
            raise refusal

    async def admit(self, tenant: Tenant, num_prompt_tokens: int) -> None:
        """Take a request of `tenant` with this many prompt tokens from its key's limits, or raise
        `RateLimitedError` (`PromptOverBudgetError` if no wait would let the prompt in)."""
        tenant.check_prompt(num_prompt_tokens)
        if not tenant.is_limited:
            return
        if not self.is_shared:
            tenant.admit(num_prompt_tokens)
            return
        state = self._keys[tenant.name]
        refusal = state.surely_refused(num_prompt_tokens)
        if refusal is not None:
            raise refusal
        sent_s = self._clock()
        if self._is_limiter_lost and sent_s < self._retry_limiter_at_s:
            state.fallback.admit(num_prompt_tokens)
            return
        try:
            verdict = await asyncio.wait_for(self._admit_call(tenant.name, num_prompt_tokens), LIMITER_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the limiter is restarting: this ingress's share of the limits
            self._limiter_lost(exc)
            state.fallback.admit(num_prompt_tokens)
            return
        self._limiter_back()
        state.heard(verdict, sent_s)
        if verdict.limit is not None:
            raise tenant.refusal(verdict.limit, verdict.wait_s)

    def charge(self, tenant: Tenant, num_tokens: int) -> None:
        """The output tokens of an answer of `tenant` (taken when it ends; not waited for)."""
        if not tenant.is_limited or num_tokens <= 0:
            return
        if not self.is_shared:
            tenant.charge_output(num_tokens)
            return
        if self._is_limiter_lost:
            self._keys[tenant.name].fallback.charge_output(num_tokens)
        try:
            self._charge_call(tenant.name, num_tokens)
        except Exception as exc:  # noqa: BLE001 - only sending can fail here; the limiter's answer is not awaited
            self._limiter_lost(exc)

    def _limiter_lost(self, error: BaseException) -> None:
        self._retry_limiter_at_s = self._clock() + LIMITER_RETRY_S
        if not self._is_limiter_lost:
            self._is_limiter_lost = True
            logger.warning("API key limiter unreachable (%s): this ingress admits by 1/N of each key's limits "
                           "until it answers again", type(error).__name__)

    def _limiter_back(self) -> None:
        if self._is_limiter_lost:
            self._is_limiter_lost = False
            logger.info("API key limiter reachable again: limits are the service's")
