"""Rate limits: token buckets, the global quota drawn in batches from Mixer, the RateLimit kind."""

from __future__ import annotations

import math
import random

import pytest

from meshctl.core.ratelimit import (
    Allowed,
    AskMixer,
    GlobalQuota,
    Grant,
    Limited,
    QuotaBatcher,
    RateLimitConfigError,
    RateLimiter,
    TokenBucket,
    WaitForGrant,
    batch_size,
)
from meshctl.loader.resources import load_resources_text
from meshctl.model.base import Duration
from meshctl.model.istio import SPEC_TYPES
from meshctl.model.ratelimit import (
    GlobalRateLimit,
    LocalRateLimit,
    RateLimit,
    RateLimitMatch,
    RateLimitRule,
    TokenBucketSettings,
    ratelimit_problems,
)


# ---------------------------------------------------------------- token bucket


def test_bucket_allows_exactly_max_tokens_then_limits_until_the_fill() -> None:
    b = TokenBucket(max_tokens=10, tokens_per_fill=10, fill_interval=1.0, now=100.0)
    results = [b.take(100.0) for _ in range(10)]
    assert all(isinstance(r, Allowed) for r in results)
    assert [r.remaining for r in results] == list(range(9, -1, -1))
    r = b.take(100.0)
    assert isinstance(r, Limited) and r.status == 429
    assert r.retry_after == 1.0 and r.remaining == 0
    assert r.headers() == [
        ("x-ratelimit-limit", "10"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "1"),
        ("retry-after", "1"),
    ]
    half = b.take(100.5)
    assert isinstance(half, Limited) and half.retry_after == 0.5
    assert dict(half.headers())["retry-after"] == "1"  # whole seconds, rounded up
    # the fill at 101.0 brings 10 tokens back
    assert sum(isinstance(b.take(101.0), Allowed) for _ in range(12)) == 10


def test_discrete_refill_and_burst_cap() -> None:
    b = TokenBucket(max_tokens=5, tokens_per_fill=1, fill_interval=0.25, now=0.0)
    for _ in range(5):
        assert isinstance(b.take(0.0), Allowed)
    assert isinstance(b.take(0.2), Limited)
    assert b.available(0.49) == 1  # one fill at 0.25
    assert b.available(0.5) == 2
    assert b.available(60.0) == 5  # idle for long: never more than the burst
    ok = b.take(60.0)
    assert isinstance(ok, Allowed) and ok.headers() == [
        ("x-ratelimit-limit", "5"),
        ("x-ratelimit-remaining", "4"),
        ("x-ratelimit-reset", "1"),
    ]


def test_retry_after_counts_the_fills_needed() -> None:
    b = TokenBucket(max_tokens=4, tokens_per_fill=1, fill_interval=1.0, now=0.0)
    assert isinstance(b.take(0.0, n=4), Allowed)
    r = b.take(0.25, n=3)
    assert isinstance(r, Limited) and r.retry_after == pytest.approx(2.75)
    assert dict(r.headers())["retry-after"] == "3"
    never = b.take(0.25, n=5)
    assert isinstance(never, Limited) and never.retry_after == math.inf
    assert "retry-after" not in dict(never.headers())


def test_bad_bucket_is_named() -> None:
    with pytest.raises(RateLimitConfigError, match="maxTokens"):
        TokenBucket(0, 1, 1.0, 0.0)
    with pytest.raises(RateLimitConfigError, match="fillInterval"):
        TokenBucket(1, 1, 0.0, 0.0)


# ---------------------------------------------------------------- global quota


def test_batch_is_ten_percent_of_the_per_second_limit() -> None:
    assert batch_size(100, "SECOND") == 10
    assert batch_size(6000, "MINUTE") == 10
    assert batch_size(5, "SECOND") == 1
    with pytest.raises(RateLimitConfigError, match="WEEK"):
        batch_size(5, "WEEK")


def test_first_request_waits_for_the_first_grant() -> None:
    q = QuotaBatcher("ratings", 100)
    assert q.take(0.0) == WaitForGrant("ratings")
    assert q.need(0.0) == AskMixer("ratings", 10)
    assert q.need(0.0) is None  # one ask at a time
    q.on_grant(Grant(granted=10, valid_for=0.8), now=0.01)
    assert all(isinstance(q.take(0.02), Allowed) for _ in range(5))
    assert q.need(0.02) == AskMixer("ratings", 10)  # at the low-water mark: ask before running out


def test_tokens_expire_with_mixers_window() -> None:
    q = QuotaBatcher("k", 100)
    q.take(0.0)
    q.need(0.0)
    q.on_grant(Grant(10, valid_for=0.5), now=0.1)
    assert isinstance(q.take(0.49), Allowed)
    assert isinstance(q.take(0.5), WaitForGrant)  # 9 tokens left, but the window is over


def test_exhausted_window_limits_until_it_ends() -> None:
    mixer = GlobalQuota(20, "SECOND")  # grants are capped at 2 tokens
    q = QuotaBatcher("k", 20, batch_fraction=1.0)  # asks for 20 at a time
    served = 0
    for _ in range(30):
        d = q.take(0.1)
        if isinstance(d, Allowed):
            served += 1
        else:
            assert isinstance(d, WaitForGrant)  # a capped grant is not exhaustion
            ask = q.need(0.1)
            q.on_grant(mixer.grant("p1", ask.tokens, 0.1), now=0.1)
        if served == 20:
            break
    assert served == 20 and mixer.remaining(0.1) == 0
    r = q.take(0.25)
    assert isinstance(r, Limited) and r.reason == "global" and r.retry_after == pytest.approx(0.75)
    assert dict(r.headers())["retry-after"] == "1"
    assert q.need(0.5) is None  # no asks while the window is exhausted
    assert isinstance(q.take(1.0), WaitForGrant)
    assert q.need(1.0) is not None


@pytest.mark.parametrize("deny", [False, True])
def test_mixer_unreachable_fails_open_or_closed(deny: bool) -> None:
    q = QuotaBatcher("k", 100, failure_mode_deny=deny, retry_interval=1.0)
    q.take(0.0)
    q.need(0.0)
    q.on_failure(0.5)
    r = q.take(0.6)
    if deny:
        assert isinstance(r, Limited) and r.reason == "global-unavailable"
        assert dict(r.headers())["retry-after"] == "1"
    else:
        assert isinstance(r, Allowed)
    assert q.need(0.7) is None  # retried after retry_interval
    q.take(1.5)
    assert q.need(1.5) == AskMixer("k", 10)
    q.on_grant(Grant(10, 0.5), now=1.52)
    assert isinstance(q.take(1.6), Allowed)
    # back to normal: past the grant, requests wait for Mixer again
    assert isinstance(q.take(2.1), WaitForGrant)


def test_mixer_grants_fairly_and_never_more_than_the_limit() -> None:
    mixer = GlobalQuota(100, "SECOND")
    # a greedy first asker gets one batch cap (10% of the limit), not the window
    assert mixer.grant("greedy", 1000, 0.0).granted == 10
    grants = {"a": 0, "b": 0, "greedy": 10}
    for _ in range(50):
        for p in ("a", "b", "greedy"):
            grants[p] += mixer.grant(p, 10, 0.5).granted
    assert sum(grants.values()) == 100
    assert min(grants.values()) >= 30
    g = mixer.grant("a", 10, 0.75)
    assert g.granted == 0 and g.valid_for == pytest.approx(0.25)
    assert mixer.grant("a", 10, 1.0).granted == 10  # new window


def test_three_proxies_never_exceed_the_global_limit_per_window() -> None:
    """Fake clock in ms; each proxy has its own clock offset; Mixer answers after 3 ms."""
    limit = 100
    mixer = GlobalQuota(limit, "SECOND")
    offsets = [0.0, 1234.5, -77.25]  # proxies' monotonic clocks differ from Mixer's
    proxies = [QuotaBatcher("ratings", limit) for _ in offsets]
    rand = random.Random(11)
    in_flight: list[tuple[int, int, int]] = []  # (deliver at ms, proxy, tokens)
    waiting = [0, 0, 0]
    served_per_window: dict[int, int] = {}
    served_per_proxy = [0, 0, 0]
    limited = 0
    for ms in range(0, 6000):
        t = ms / 1000
        for item in [x for x in in_flight if x[0] == ms]:
            in_flight.remove(item)
            _, i, tokens = item
            # Mixer decides when the ask arrives (3 ms after sending); the proxy sees it 3 ms later
            proxies[i].on_grant(mixer.grant(f"p{i}", tokens, t - 0.003), now=t + offsets[i])
        for i, q in enumerate(proxies):
            arrivals = waiting[i] + (1 if rand.random() < 0.12 else 0)  # ~120 rps each, 360 total
            waiting[i] = 0
            for _ in range(arrivals):
                d = q.take(t + offsets[i])
                if isinstance(d, Allowed):
                    served_per_window[ms // 1000] = served_per_window.get(ms // 1000, 0) + 1
                    served_per_proxy[i] += 1
                elif isinstance(d, WaitForGrant):
                    waiting[i] += 1
                else:
                    limited += 1
            ask = q.need(t + offsets[i])
            if ask is not None:
                in_flight.append((ms + 6, i, ask.tokens))
    assert all(n <= limit for n in served_per_window.values()), served_per_window
    assert sum(served_per_window.values()) >= 5 * 90  # the quota is actually used
    assert limited > 0
    assert min(served_per_proxy) >= 100  # nobody starved


# ---------------------------------------------------------------- the RateLimit kind


RATINGS_LIMIT = """
apiVersion: meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: ratings-limit}
spec:
  selector: {matchLabels: {app: ratings}}
  local: {tokenBucket: {maxTokens: 10, tokensPerFill: 10, fillInterval: 1s}}
  global: {requestsPerUnit: 100, unit: SECOND, failureModeDeny: false}
  rules:
  - match: {paths: ["/ratings/*"], principals: ["cluster.local/ns/default/sa/reviews"]}
    local: {tokenBucket: {maxTokens: 2, tokensPerFill: 2, fillInterval: 500ms}}
"""


def test_kind_is_registered_and_loads_from_yaml() -> None:
    assert SPEC_TYPES[("meshctl.io", "RateLimit")] is RateLimit
    (res,) = load_resources_text(RATINGS_LIMIT, "ratings-limit.yaml")
    spec = res.spec
    assert isinstance(spec, RateLimit) and res.name == "ratings-limit"
    assert spec.selector.match_labels == {"app": "ratings"}
    assert spec.local.token_bucket == TokenBucketSettings(10, 10, Duration(1.0))
    assert spec.global_ == GlobalRateLimit(requests_per_unit=100, unit="SECOND", failure_mode_deny=False)
    assert spec.rules[0].local.token_bucket.fill_interval == 0.5
    assert ratelimit_problems(spec) == []


def test_unknown_field_in_the_kind_is_an_error_naming_it() -> None:
    bad = RATINGS_LIMIT.replace("maxTokens: 10,", "maxTokenz: 10,")
    with pytest.raises(Exception) as err:
        load_resources_text(bad, "ratings-limit.yaml")
    assert "maxTokenz" in str(err.value)


def test_limiter_rules_first_match_and_fallback() -> None:
    (res,) = load_resources_text(RATINGS_LIMIT.replace("  global: {requestsPerUnit: 100, unit: SECOND, failureModeDeny: false}\n", ""))
    lim = RateLimiter("ratings-limit", res.spec, now=0.0)
    reviews = "spiffe://cluster.local/ns/default/sa/reviews"
    # reviews on /ratings/* has its own bucket of 2
    got = [lim.check(path="/ratings/0?x=1", principal=reviews, now=0.0) for _ in range(3)]
    assert [type(r) for r in got] == [Allowed, Allowed, Limited]
    assert got[2].retry_after == 0.5
    # others use the top-level bucket of 10, untouched so far
    other = [lim.check(path="/ratings/0", principal="spiffe://cluster.local/ns/default/sa/productpage", now=0.0)
             for _ in range(11)]
    assert sum(isinstance(r, Allowed) for r in other) == 10
    # plaintext (no principal) does not match a rule that names principals
    assert isinstance(lim.check(path="/ratings/0", principal=None, now=0.0), Limited)
    assert isinstance(lim.check(path="/ratings/0", principal=reviews, now=0.5), Allowed)
    assert lim.asks(0.5) == []


def test_limiter_with_global_quota() -> None:
    spec = RateLimit(
        local=LocalRateLimit(TokenBucketSettings(max_tokens=5, tokens_per_fill=5, fill_interval=Duration(1.0))),
        global_=GlobalRateLimit(requests_per_unit=20),
        rules=(RateLimitRule(name="post", match=RateLimitMatch(methods=("POST",)),
                             global_=GlobalRateLimit(requests_per_unit=10, failure_mode_deny=True)),),
    )
    lim = RateLimiter("rl", spec, now=0.0)
    assert set(lim.batchers) == {"rl", "rl/post"}
    d = lim.check(path="/", now=0.0)
    assert d == WaitForGrant("rl")
    assert lim.asks(0.0) == [AskMixer("rl", 2)]
    lim.batcher("rl").on_grant(Grant(2, 1.0), now=0.0)
    # the waiting request did not use up a local token
    assert [type(lim.check(path="/", now=0.0)) for _ in range(5)] == [Allowed, Allowed, WaitForGrant, WaitForGrant,
                                                                       WaitForGrant]
    lim.batcher("rl").on_failure(0.0)  # Mixer away: fail open, local bucket still applies
    assert [type(lim.check(path="/", now=0.0)) for _ in range(4)] == [Allowed, Allowed, Allowed, Limited]
    # POST uses its rule's quota (fail closed), and the top-level local bucket
    assert lim.check(path="/", method="POST", now=1.0) == WaitForGrant("rl/post")
    assert AskMixer("rl/post", 1) in lim.asks(1.0)
    lim.batcher("rl/post").on_failure(1.0)
    r = lim.check(path="/", method="POST", now=1.0)
    assert isinstance(r, Limited) and r.reason == "global-unavailable"


def test_problems_name_the_field() -> None:
    spec = RateLimit(
        local=LocalRateLimit(TokenBucketSettings(max_tokens=0)),
        global_=GlobalRateLimit(requests_per_unit=10, unit="WEEK"),
        rules=(RateLimitRule(match=RateLimitMatch(paths=("/a*b",))),),
    )
    problems = ratelimit_problems(spec)
    assert "spec.local.tokenBucket.maxTokens: must be at least 1, got 0" in problems
    assert "spec.local.tokenBucket.fillInterval: required" in problems
    assert any(p.startswith("spec.global.unit: 'WEEK'") for p in problems)
    assert "spec.rules[0]: at least one of local or global must be set" in problems
    assert any(p.startswith("spec.rules[0].match.paths[0]") for p in problems)
    assert ratelimit_problems(RateLimit()) == ["spec: at least one of local, global or rules must be set"]


def test_fills_at_decimal_intervals_are_not_lost_to_float_rounding() -> None:
    b = TokenBucket(max_tokens=3, tokens_per_fill=1, fill_interval=0.1, now=0.0)
    for _ in range(3):
        b.take(0.0)
    assert b.available(0.3) == 3
