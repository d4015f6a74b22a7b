"""API keys as tenants (serve_app/tenants.py) and their configuration (config/serve.py): token buckets, the
429's Retry-After, key lookup; no Ray, no HTTP."""

from __future__ import annotations

import pytest
from pagedserve.config.engine import ConfigError
from pagedserve.config.serve import ServeArgs
from pagedserve.serve_app.tenants import (
    KeyLimits,
    NotAuthenticatedError,
    PromptOverBudgetError,
    RateLimitedError,
    Tenant,
    Tenants,
    TokenBucket,
)
from fake_clock import FakeClock  # beside this file (conftest puts the folder on sys.path)


def test_bucket_refills_at_its_rate_up_to_its_capacity_and_may_be_overdrawn():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2.0, capacity=4.0, clock=clock)
    assert bucket.seconds_until(4) == 0
    bucket.force_take(4)
    assert bucket.seconds_until(1) == pytest.approx(0.5)
    clock.now += 10
    assert bucket.level == 4.0  # capped
    bucket.force_take(10)
    assert bucket.level == -6.0 and bucket.seconds_until(2) == pytest.approx(4.0)
    assert bucket.seconds_until(5) == float("inf")


def test_requests_per_s_refuses_past_the_burst_with_whole_seconds_to_wait():
    clock = FakeClock()
    tenant = Tenant("flood", KeyLimits(requests_per_s=0.5), clock)
    tenant.admit(10)  # burst: at least one request
    with pytest.raises(RateLimitedError) as refused:
        tenant.admit(10)
    assert refused.value.limit == "requests_per_s" and refused.value.retry_after_s == 2
    assert "flood" in refused.value.message and "0.5 requests/s" in refused.value.message
    clock.now += 2
    tenant.admit(10)


def test_tokens_per_min_takes_prompts_first_and_outputs_after():
    clock = FakeClock()
    tenant = Tenant("t", KeyLimits(tokens_per_min=600), clock)  # 10 tokens/s, one minute's worth of burst
    tenant.admit(500)
    tenant.charge_output(300)  # the answer was long: the bucket is now 200 below zero
    with pytest.raises(RateLimitedError) as refused:
        tenant.admit(10)
    assert refused.value.limit == "tokens_per_min" and refused.value.retry_after_s == 21
    clock.now += 21
    tenant.admit(10)
    with pytest.raises(PromptOverBudgetError, match="more than API key 't' may use in a minute"):
        tenant.admit(601)


def test_a_refused_request_takes_nothing_from_either_bucket():
    clock = FakeClock()
    tenant = Tenant("t", KeyLimits(requests_per_s=1, tokens_per_min=60), clock)
    tenant.admit(50)
    clock.now += 1  # a request back, 1 token back: 11 in the bucket
    with pytest.raises(RateLimitedError) as refused:
        tenant.admit(20)
    assert refused.value.limit == "tokens_per_min"
    assert tenant.requests.level == 1 and tenant.tokens.level == 11
    tenant.admit(11)


def test_unlimited_key_never_refuses():
    tenant = Tenant("free", KeyLimits(), FakeClock())
    assert not tenant.is_limited
    for _ in range(1000):
        tenant.admit(10**6)
        tenant.charge_output(10**6)


def test_keys_identify_their_tenant_and_nothing_else_does():
    tenants = Tenants([("a", "key-a", KeyLimits()), ("b", "key-b", KeyLimits(requests_per_s=1))])
    assert tenants.identify("Bearer key-b").name == "b" and tenants.identify("bearer  key-a ").name == "a"
    for header in ("", "Bearer", "Bearer key-c", "Basic key-a", "key-a"):
        with pytest.raises(NotAuthenticatedError):
            tenants.identify(header)
    assert tenants.names == ["a", "b"]
    open_service = Tenants([])
    assert open_service.is_open and open_service.identify("").name == "anonymous"


def test_config_keys_from_env_and_the_single_key_as_default(monkeypatch):
    monkeypatch.setenv("TEAM_A_KEY", "secret-a")
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "secret-default")
    args = ServeArgs.from_args({"api_keys": [
        {"name": "team-a", "key_env": "TEAM_A_KEY", "requests_per_s": 5, "tokens_per_min": 60000},
        {"name": "team-b", "key": "secret-b"},
    ]})
    keys = {key.name: key for key in args.resolved_api_keys()}
    assert keys["team-a"].key.get_secret_value() == "secret-a" and keys["team-a"].requests_per_s == 5
    assert keys["default"].key.get_secret_value() == "secret-default" and keys["default"].tokens_per_min is None
    assert "secret" not in repr(args)  # keys are SecretStr: never in logs or reprs
    monkeypatch.delenv("TEAM_A_KEY")
    with pytest.raises(ConfigError, match=r"\$TEAM_A_KEY, which is not set"):
        args.resolved_api_keys()


@pytest.mark.parametrize("keys, message", [
    ([{"name": "a", "key": "x"}, {"name": "a", "key": "y"}], "repeated: \\['a'\\]"),
    ([{"name": "a"}], "exactly one of key and key_env"),
    ([{"name": "a", "key": "x", "key_env": "X"}], "exactly one of key and key_env"),
    ([{"name": "a b", "key": "x"}], "api_keys.0.name"),
    ([{"name": "a", "key": "x", "requests_per_s": 0}], "api_keys.0.requests_per_s"),
])
def test_bad_key_configs_name_the_field(keys, message):
    with pytest.raises(ConfigError, match=message):
        ServeArgs.from_args({"api_keys": keys})


def test_two_keys_with_one_value_are_refused():
    args = ServeArgs.from_args({"api_keys": [{"name": "a", "key": "x"}, {"name": "b", "key": "x"}]})
    with pytest.raises(ConfigError, match="same value"):
        args.resolved_api_keys()
