"""Retry decisions (core/retry.py, and core/retrypolicy.py's policies): Istio's HTTPRetry with Envoy's retry_on semantics."""

from __future__ import annotations

import random

import pytest

from meshctl.core.retry import (
    NO_RETRY,
    Outcome,
    RetryConfigError,
    RetryPolicy,
    backoff,
    should_retry,
)
from meshctl.core.retrypolicy import retry_policy
from meshctl.model.base import Duration
from meshctl.model.istio import HTTPRetry
from meshctl.model.proxyconfig import Settings

SETTINGS = Settings()


def policy(retry_on: str, attempts: int = 3) -> RetryPolicy:
    return retry_policy(HTTPRetry(attempts=attempts, retry_on=retry_on), SETTINGS)


def test_route_without_retries_gets_istio_default_policy():
    p = retry_policy(None, SETTINGS)
    assert p.attempts == 2
    assert p.retriable_status_codes == {503}
    assert p.retry_on == {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    assert p.per_try_timeout is None
    # what the default retries, and what it does not
    assert should_retry(p, 0, Outcome(status=503), body_replayable=True)
    assert should_retry(p, 0, Outcome(failure="connect-failure"), body_replayable=True)
    assert should_retry(p, 0, Outcome(status=200, grpc_status=14), body_replayable=True)
    assert not should_retry(p, 0, Outcome(status=500), body_replayable=True)
    assert not should_retry(p, 0, Outcome(status=502), body_replayable=True)
    assert not should_retry(p, 0, Outcome(failure="reset"), body_replayable=True)
    assert not should_retry(p, 0, Outcome(failure="timeout"), body_replayable=True)


def test_default_attempts_follow_settings():
    p = retry_policy(None, Settings(default_retry_attempts=5))
    assert p.attempts == 5
    assert retry_policy(None, Settings(default_retry_attempts=0)) == NO_RETRY


def test_zero_attempts_disables_retries():
    p = retry_policy(HTTPRetry(attempts=0, retry_on="5xx"), SETTINGS)
    assert p.attempts == 0
    assert not should_retry(p, 0, Outcome(status=503), body_replayable=True)
    assert not should_retry(p, 0, Outcome(failure="connect-failure"), body_replayable=True)


def test_retries_without_retry_on_use_default_conditions_with_route_attempts():
    p = retry_policy(HTTPRetry(attempts=4, per_try_timeout=Duration(2.0)), SETTINGS)
    assert p.attempts == 4
    assert p.per_try_timeout == 2.0
    assert p.retriable_status_codes == {503}
    assert should_retry(p, 3, Outcome(status=503), body_replayable=True)
    assert not should_retry(p, 4, Outcome(status=503), body_replayable=True)


def test_bare_status_codes_in_retry_on_are_retriable_status_codes():
    p = policy("connect-failure,429, 503")
    assert p.retriable_status_codes == {429, 503}
    assert "retriable-status-codes" in p.retry_on
    assert should_retry(p, 0, Outcome(status=429), body_replayable=True)
    assert should_retry(p, 0, Outcome(status=503), body_replayable=True)
    assert not should_retry(p, 0, Outcome(status=500), body_replayable=True)


def test_explicit_retry_on_replaces_default_status_codes():
    p = policy("gateway-error")
    assert p.retriable_status_codes == frozenset()
    assert not should_retry(policy("connect-failure"), 0, Outcome(status=503), body_replayable=True)


def test_unknown_retry_on_is_a_config_error_naming_the_value():
    with pytest.raises(RetryConfigError, match="'5xxx'"):
        policy("connect-failure,5xxx")
    with pytest.raises(RetryConfigError, match="'999'"):
        policy("999")


@pytest.mark.parametrize(
    ("retry_on", "outcome", "retried"),
    [
        # 5xx: every 5xx and every failure without a response
        ("5xx", Outcome(status=500), True),
        ("5xx", Outcome(status=503), True),
        ("5xx", Outcome(status=404), False),
        ("5xx", Outcome(status=200), False),
        ("5xx", Outcome(failure="connect-failure"), True),
        ("5xx", Outcome(failure="reset"), True),
        ("5xx", Outcome(failure="refused-stream"), True),
        ("5xx", Outcome(failure="timeout"), True),
        # gateway-error: only 502/503/504 among responses, plus per-try timeouts
        ("gateway-error", Outcome(status=502), True),
        ("gateway-error", Outcome(status=503), True),
        ("gateway-error", Outcome(status=504), True),
        ("gateway-error", Outcome(status=500), False),
        ("gateway-error", Outcome(failure="timeout"), True),
        # reset: no response at all
        ("reset", Outcome(failure="reset"), True),
        ("reset", Outcome(failure="timeout"), True),
        ("reset", Outcome(failure="connect-failure"), True),
        ("reset", Outcome(status=503), False),
        # narrow conditions
        ("connect-failure", Outcome(failure="connect-failure"), True),
        ("connect-failure", Outcome(failure="reset"), False),
        ("connect-failure", Outcome(failure="timeout"), False),
        ("refused-stream", Outcome(failure="refused-stream"), True),
        ("refused-stream", Outcome(failure="connect-failure"), False),
        ("reset-before-request", Outcome(failure="connect-failure"), True),
        ("reset-before-request", Outcome(failure="reset"), False),
        ("retriable-4xx", Outcome(status=409), True),
        ("retriable-4xx", Outcome(status=404), False),
        # gRPC status names
        ("cancelled", Outcome(status=200, grpc_status=1), True),
        ("deadline-exceeded", Outcome(status=200, grpc_status=4), True),
        ("resource-exhausted", Outcome(status=200, grpc_status=8), True),
        ("internal", Outcome(status=200, grpc_status=13), True),
        ("unavailable", Outcome(status=200, grpc_status=14), True),
        ("unavailable", Outcome(status=200, grpc_status=13), False),
        ("unavailable", Outcome(status=200, grpc_status=0), False),
        ("cancelled,internal", Outcome(status=200, grpc_status=2), False),
    ],
)
def test_retry_on_conditions_follow_envoy(retry_on, outcome, retried):
    assert should_retry(policy(retry_on), 0, outcome, body_replayable=True) is retried


def test_never_retry_when_body_is_not_replayable():
    p = policy("5xx,connect-failure")
    assert not should_retry(p, 0, Outcome(failure="connect-failure"), body_replayable=False)
    assert not should_retry(p, 0, Outcome(status=503), body_replayable=False)


def test_attempts_bound_the_number_of_retries():
    p = policy("5xx", attempts=2)
    outcome = Outcome(status=503)
    assert [should_retry(p, done, outcome, body_replayable=True) for done in range(4)] == [True, True, False, False]


def test_unknown_failure_kind_is_rejected_loudly():
    with pytest.raises(ValueError, match="'eof'"):
        should_retry(policy("5xx"), 0, Outcome(failure="eof"), body_replayable=True)


def test_backoff_is_fully_jittered_exponential_capped_at_max_interval():
    p = policy("5xx")
    rand = random.Random(7)
    for done, ceiling in [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (10, 0.25), (100, 0.25)]:
        samples = [backoff(p, done, rand) for _ in range(2000)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # fully jittered: spread over the whole interval, not clustered at the top
        assert min(samples) < ceiling * 0.05
        assert max(samples) > ceiling * 0.95
        assert abs(sum(samples) / len(samples) - ceiling / 2) < ceiling * 0.05


def test_backoff_is_reproducible_with_a_seeded_random():
    p = policy("5xx")
    a = [backoff(p, i % 4, random.Random(1)) for i in range(5)]
    b = [backoff(p, i % 4, random.Random(1)) for i in range(5)]
    assert a == b
