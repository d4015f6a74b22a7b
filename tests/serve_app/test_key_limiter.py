"""Per-key limits for the whole service (serve_app/key_limiter.py): several ingresses' `KeyBudgets` over one
`KeyLimiter`, the refusals an ingress gives without asking, and the 1/N share it admits by while the limiter is
gone. Plain Python, a fake clock; the limiter's calls are plain coroutines."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from pagedserve.serve_app.key_limiter import LIMITER_RETRY_S, KeyBudgets, KeyLimiter, Verdict
from pagedserve.serve_app.tenants import KeyLimits, PromptOverBudgetError, RateLimitedError, Tenants
from fake_clock import FakeClock  # beside this file (conftest puts the folder on sys.path)


class Service:
    """`num_ingresses` ingresses' budgets over one limiter; counts the limiter's calls."""

    def __init__(self, limits: dict[str, KeyLimits], num_ingresses: int, clock: FakeClock) -> None:
        self.clock = clock
        self.limiter = KeyLimiter(limits, clock)
        self.tenants = Tenants([(name, f"key-{name}", key_limits) for name, key_limits in limits.items()]
                               + [("free", "key-free", KeyLimits())], clock)
        self.num_admit_calls = 0
        self.is_down = False
        self.ingresses = [KeyBudgets(self.tenants.all(), self._admit, self._charge, num_ingresses, clock)
                          for _ in range(num_ingresses)]

    async def _admit(self, name: str, num_prompt_tokens: int) -> Verdict:
        self.num_admit_calls += 1
        if self.is_down:
            raise ConnectionError("limiter replica is restarting")
        return await self.limiter.admit(name, num_prompt_tokens)

    def _charge(self, name: str, num_tokens: int) -> None:
        if not self.is_down:
            asyncio.run(self.limiter.charge(name, num_tokens))

    def tenant(self, name: str):
        return self.tenants.identify(f"Bearer key-{name}")

    def admit(self, ingress: int, name: str, num_prompt_tokens: int = 10) -> bool:
        budgets, tenant = self.ingresses[ingress], self.tenant(name)
        try:
            budgets.check_arrival(tenant)
            asyncio.run(budgets.admit(tenant, num_prompt_tokens))
        except RateLimitedError:
            return False
        return True


def test_a_key_gets_its_limit_once_over_every_ingress() -> None:
    clock = FakeClock()
    service = Service({"team": KeyLimits(requests_per_s=2)}, num_ingresses=4, clock=clock)
    admitted = sum(service.admit(i % 4, "team") for i in range(40))  # a burst spread over four ingresses
    assert admitted == 2  # one second's worth, not four
    for _ in range(10):  # then 2 a second, wherever they arrive
        clock.now += 0.5
        assert sum(service.admit(random.randrange(4), "team") for _ in range(5)) == 1
    assert all(service.admit(i % 4, "free") for i in range(100))  # a key without limits is never held back


def test_tokens_are_shared_too_and_outputs_are_charged_wherever_they_end() -> None:
    clock = FakeClock()
    service = Service({"team": KeyLimits(tokens_per_min=600)}, num_ingresses=2, clock=clock)
    assert service.admit(0, "team", 400) and service.admit(1, "team", 200)
    assert not service.admit(0, "team", 10) and not service.admit(1, "team", 10)
    clock.now += 30  # 300 back
    service.ingresses[1].charge(service.tenant("team"), 250)  # an answer of 250 tokens ends on ingress 1
    assert not service.admit(0, "team", 60)  # 50 left
    assert service.admit(0, "team", 50)
    with pytest.raises(PromptOverBudgetError):
        asyncio.run(service.ingresses[0].admit(service.tenant("team"), 601))


def test_an_ingress_refuses_a_flood_without_asking_and_only_what_the_limiter_would() -> None:
    """Each refusal given without a call is one the limiter would give at that moment (its bound of the levels
    never falls below the limiter's); a flood at 10x the limit costs about a call per admitted request."""
    clock = FakeClock()
    limits = KeyLimits(requests_per_s=4, tokens_per_min=6000)
    service = Service({"team": limits}, num_ingresses=3, clock=clock)
    rng = random.Random(0)
    num_admitted = num_sent = 0
    for _ in range(400):  # 40 requests/s for 10 s, outputs charged at random ingresses
        clock.now += 0.025
        ingress, prompt = rng.randrange(3), rng.randrange(1, 300)
        calls_before = service.num_admit_calls
        would_admit = service.limiter._tenants["team"].seconds_until_admitted(prompt)[0] is None
        is_admitted = service.admit(ingress, "team", prompt)
        num_sent += 1
        if service.num_admit_calls == calls_before:  # decided in the ingress
            assert not is_admitted and not would_admit
        else:
            assert is_admitted == would_admit
        if is_admitted:
            num_admitted += 1
            service.ingresses[rng.randrange(3)].charge(service.tenant("team"), rng.randrange(0, 200))
    assert num_admitted <= 4 + 10 * 4
    assert service.num_admit_calls <= 3 * num_admitted + 10, (service.num_admit_calls, num_admitted, num_sent)


def test_without_the_limiter_an_ingress_admits_by_its_share_and_comes_back(caplog) -> None:
    clock = FakeClock()
    service = Service({"team": KeyLimits(requests_per_s=8)}, num_ingresses=4, clock=clock)
    service.is_down = True
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert sum(service.admit(0, "team") for _ in range(20)) == 2  # 8/4 a second, a burst of 2
    assert sum("limiter unreachable" in r.getMessage() for r in caplog.records) == 1
    assert service.num_admit_calls == 1  # then the share alone until the retry time
    service.is_down = False
    clock.now += LIMITER_RETRY_S
    assert sum(service.admit(0, "team") for _ in range(20)) == 8  # the service's bucket, full
    assert service.num_admit_calls == 1 + 8  # asked for each admitted one; the rest refused by the bound


def test_a_local_ingress_uses_its_own_buckets_exactly() -> None:
    clock = FakeClock()
    tenants = Tenants([("team", "key-team", KeyLimits(requests_per_s=1))], clock)
    budgets = KeyBudgets(tenants.all(), clock=clock)
    team = tenants.identify("Bearer key-team")
    asyncio.run(budgets.admit(team, 5))
    with pytest.raises(RateLimitedError) as refused:
        budgets.check_arrival(team)
    assert refused.value.retry_after_s == 1
    clock.now += 1
    budgets.check_arrival(team)
    asyncio.run(budgets.admit(team, 5))
