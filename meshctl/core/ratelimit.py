"""Rate-limit decisions: local token buckets, and a global quota drawn from Mixer in batches.

Pure: ``now`` (monotonic seconds of the process that calls) is passed in;
the talking to Mixer is someone else's. Every call is O(1) except
``RateLimiter.check``, which is O(number of rules).

Local (per sidecar), Envoy's local rate limit:
1. A ``TokenBucket`` starts full with ``max_tokens``. Every whole
   ``fill_interval`` since the last fill adds ``tokens_per_fill`` tokens, up to
   ``max_tokens`` (fills are discrete, as in Envoy, not continuous).
2. ``take(now, n)`` spends n tokens if there are n, else it is ``Limited``:
   answer 429 with ``headers()``: ``x-ratelimit-limit`` (max_tokens),
   ``x-ratelimit-remaining``, ``x-ratelimit-reset`` (seconds to the next
   fill, rounded up) and ``retry-after`` (seconds until n tokens are there,
   rounded up).

Global (mesh-wide), Mixer's quota, proxy side (``QuotaBatcher``, per quota key):
3. The proxy draws tokens from Mixer in batches of ``batch`` (10% of the
   per-second limit, at least 1) and serves requests from them locally.
   It asks for the next batch when it holds ``batch // 2`` tokens or fewer,
   one ask at a time (``need(now)`` returns ``AskMixer`` once; the I/O layer
   answers with ``on_grant`` or ``on_failure``).
4. A grant is valid until the end of Mixer's current window: ``valid_for``
   seconds counted from when the ask was *sent* (so clock offsets between
   processes do not matter and latency only shortens it); unused tokens then
   expire, so what proxies serve in a window never exceeds what Mixer
   granted for it.
5. A grant marked ``exhausted`` means Mixer's window has nothing left:
   once the tokens held are spent, requests are ``Limited`` until the window
   ends (Retry-After = time left), and no ask is made before then. (A grant
   smaller than the ask is not by itself exhaustion: Mixer caps grants for
   fairness, rule 9.)
6. Out of tokens with an ask in flight: ``WaitForGrant`` — the proxy waits
   for ``on_grant``/``on_failure`` (its Mixer call must have a timeout) and
   then calls ``take`` again.
7. Mixer unreachable (``on_failure``): until a grant arrives again, requests
   beyond the tokens held are allowed (``failureModeDeny: false``, fail open)
   or ``Limited`` (true, fail closed); the ask is retried every
   ``retry_interval`` seconds. The local bucket, when configured, applies in
   every case, so a local limit still bounds traffic when Mixer is away.

Global, Mixer side (``GlobalQuota``, per quota key):
8. Windows are ``[k·unit, (k+1)·unit)`` on Mixer's clock. Each window grants
   at most ``limit`` tokens in total.
9. Fairness: one grant is at most ``min(asked, batch cap, ceil(remaining /
   proxies))``, where ``proxies`` counts the distinct proxies that asked in
   this window or the previous one, and the batch cap is 10% of the window's
   limit (at least 1). A proxy that asks first cannot take the whole window.

Rules of a ``RateLimit`` (``RateLimiter``):
10. Rules are tried in order; the first whose match fits the request decides.
    Its ``local``/``global`` replace the top-level ones; a part it leaves out
    falls back to the top level. Each rule has its own buckets and quota key
    ``<name>/<rule name or index>``; the top level's key is ``<name>``.
11. The local bucket is checked first; the global quota only for requests
    the local bucket let through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from .errors import CoreConfigError
from ..model.ratelimit import RATE_LIMIT_UNITS, GlobalRateLimit, LocalRateLimit, RateLimit, RateLimitMatch

__all__ = [
    "Allowed",
    "Limited",
    "WaitForGrant",
    "AskMixer",
    "Grant",
    "TokenBucket",
    "QuotaBatcher",
    "GlobalQuota",
    "RateLimiter",
    "RateLimitConfigError",
    "LIMITED_STATUS",
    "bucket_from",
    "batch_size",
]

LIMITED_STATUS = 429
_INF = float("inf")


class RateLimitConfigError(CoreConfigError):
    """A rate limit that cannot be built; the message names the bad value."""


def _ceil_s(seconds: float) -> int:
    return max(0, math.ceil(seconds - 1e-9))


@dataclass(frozen=True, slots=True)
class Allowed:
    remaining: int | None = None  # tokens left (None: not known, e.g. global quota)
    limit: int | None = None
    reset: float | None = None  # seconds until the next fill / window

    def headers(self) -> list[tuple[str, str]]:
        """x-ratelimit-* headers for the response (empty when nothing is known)."""
        if self.limit is None:
            return []
        out = [("x-ratelimit-limit", str(self.limit))]
        if self.remaining is not None:
            out.append(("x-ratelimit-remaining", str(self.remaining)))
        if self.reset is not None:
            out.append(("x-ratelimit-reset", str(_ceil_s(self.reset))))
        return out


ALLOWED = Allowed()


@dataclass(frozen=True, slots=True)
class Limited:
    retry_after: float  # seconds; inf: never (asked for more than the bucket holds)
    remaining: int = 0
    limit: int | None = None
    reset: float | None = None
    reason: str = "local"  # "local" | "global" | "global-unavailable"

    status = LIMITED_STATUS

    def headers(self) -> list[tuple[str, str]]:
        """Headers of the 429 answer: x-ratelimit-* and Retry-After (whole seconds, rounded up)."""
        out: list[tuple[str, str]] = []
        if self.limit is not None:
            out.append(("x-ratelimit-limit", str(self.limit)))
            out.append(("x-ratelimit-remaining", str(self.remaining)))
        if self.reset is not None:
            out.append(("x-ratelimit-reset", str(_ceil_s(self.reset))))
        if self.retry_after != _INF:
            out.append(("retry-after", str(max(1, _ceil_s(self.retry_after)))))
        return out


@dataclass(frozen=True, slots=True)
class WaitForGrant:
    """Out of global tokens, an ask to Mixer is in flight: wait for it, then take() again."""

    key: str


@dataclass(frozen=True, slots=True)
class AskMixer:
    """Ask Mixer's quota service for ``tokens`` of quota ``key``."""

    key: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Grant:
    """Mixer's answer: ``granted`` tokens, usable for ``valid_for`` more seconds;
    ``exhausted``: the window has nothing left after this grant."""

    granted: int
    valid_for: float
    exhausted: bool = False


# ---------------------------------------------------------------- local


class TokenBucket:
    """Envoy's token bucket (rules 1-2)."""

    __slots__ = ("max_tokens", "tokens_per_fill", "fill_interval", "tokens", "last_fill")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float, now: float) -> None:
        if max_tokens < 1:
            raise RateLimitConfigError(f"tokenBucket.maxTokens must be at least 1, got {max_tokens}")
        if tokens_per_fill < 1:
            raise RateLimitConfigError(f"tokenBucket.tokensPerFill must be at least 1, got {tokens_per_fill}")
        if not fill_interval > 0:
            raise RateLimitConfigError(f"tokenBucket.fillInterval must be positive, got {fill_interval}s")
        self.max_tokens = max_tokens
        self.tokens_per_fill = tokens_per_fill
        self.fill_interval = float(fill_interval)
        self.tokens = max_tokens
        self.last_fill = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.last_fill
        if elapsed + 1e-9 >= self.fill_interval:
            fills = int((elapsed + 1e-9) // self.fill_interval)  # 0.3 // 0.1 is 2.0 in floats
            self.tokens = min(self.max_tokens, self.tokens + fills * self.tokens_per_fill)
            self.last_fill += fills * self.fill_interval

    def refund(self, n: int = 1) -> None:
        """Give back tokens taken for a request that was not served after all."""
        self.tokens = min(self.max_tokens, self.tokens + n)

    def available(self, now: float) -> int:
        self._refill(now)
        return self.tokens

    def take(self, now: float, n: int = 1) -> Allowed | Limited:
        self._refill(now)
        reset = self.last_fill + self.fill_interval - now
        if self.tokens >= n:
            self.tokens -= n
            return Allowed(remaining=self.tokens, limit=self.max_tokens, reset=reset)
        if n > self.max_tokens:
            retry_after = _INF
        else:
            fills = -(-(n - self.tokens) // self.tokens_per_fill)
            retry_after = reset + (fills - 1) * self.fill_interval
        return Limited(retry_after=retry_after, remaining=self.tokens, limit=self.max_tokens, reset=reset)


def bucket_from(local: LocalRateLimit, now: float) -> TokenBucket:
    """A TokenBucket from the model's ``local`` block (Envoy defaults: tokensPerFill 1)."""
    tb = local.token_bucket
    if tb is None:
        raise RateLimitConfigError("local.tokenBucket is required")
    if tb.fill_interval is None:
        raise RateLimitConfigError("local.tokenBucket.fillInterval is required")
    per_fill = tb.tokens_per_fill if tb.tokens_per_fill is not None else 1
    return TokenBucket(tb.max_tokens, per_fill, float(tb.fill_interval), now)


# ---------------------------------------------------------------- global, proxy side


def _unit_seconds(unit: str) -> float:
    try:
        return RATE_LIMIT_UNITS[unit]
    except KeyError:
        raise RateLimitConfigError(f"global.unit {unit!r} is not one of {', '.join(RATE_LIMIT_UNITS)}") from None


def batch_size(requests_per_unit: int, unit: str, fraction: float = 0.1) -> int:
    """Tokens a proxy draws per ask: ``fraction`` of the per-second limit, at least 1 (rule 3)."""
    per_second = requests_per_unit / _unit_seconds(unit)
    return max(1, math.ceil(per_second * fraction))


class QuotaBatcher:
    """One proxy's share of one global quota (rules 3-7)."""

    __slots__ = (
        "key",
        "limit",
        "failure_mode_deny",
        "batch",
        "low_water",
        "retry_interval",
        "tokens",
        "window_end",
        "inflight",
        "exhausted_until",
        "unreachable",
        "retry_at",
        "wanted",
        "asked_at",
        "unit_seconds",
        "next_tokens",
        "next_end",
    )

    def __init__(
        self,
        key: str,
        requests_per_unit: int,
        unit: str = "SECOND",
        *,
        failure_mode_deny: bool = False,
        batch_fraction: float = 0.1,
        retry_interval: float = 1.0,
    ) -> None:
        if requests_per_unit < 1:
            raise RateLimitConfigError(f"global.requestsPerUnit must be at least 1, got {requests_per_unit}")
        self.key = key
        self.limit = requests_per_unit
        self.failure_mode_deny = failure_mode_deny
        self.batch = batch_size(requests_per_unit, unit, batch_fraction)
        self.low_water = self.batch // 2
        self.retry_interval = retry_interval
        self.tokens = 0
        self.window_end = -_INF
        self.inflight = False
        self.exhausted_until = -_INF
        self.unreachable = False
        self.retry_at = -_INF
        self.wanted = False  # traffic has run the tokens down to the low-water mark
        self.asked_at = 0.0
        self.unit_seconds = _unit_seconds(unit)
        self.next_tokens = 0  # granted for Mixer's next window while this one is still running
        self.next_end = -_INF

    def _roll(self, now: float) -> None:
        if now >= self.window_end:
            self.tokens, self.window_end = self.next_tokens, self.next_end
            self.next_tokens, self.next_end = 0, -_INF
            if now >= self.window_end:
                self.tokens = 0

    def take(self, now: float) -> Allowed | Limited | WaitForGrant:
        if now >= self.window_end:
            self._roll(now)
        if self.tokens > 0:
            self.tokens -= 1
            if self.tokens <= self.low_water:
                self.wanted = True
            return ALLOWED
        self.wanted = True
        if now < self.exhausted_until:
            left = self.exhausted_until - now
            return Limited(retry_after=left, remaining=0, limit=self.limit, reset=left, reason="global")
        if self.unreachable:
            if self.failure_mode_deny:
                return Limited(retry_after=max(0.0, self.retry_at - now), reason="global-unavailable")
            return ALLOWED
        return WaitForGrant(self.key)

    def need(self, now: float) -> AskMixer | None:
        """Call after take(): an ask to send to Mixer now, or None. Marks it in flight."""
        if not self.wanted or self.inflight or now < self.exhausted_until:
            return None
        if self.unreachable and now < self.retry_at:
            return None
        self.wanted = False
        self.inflight = True
        self.asked_at = now
        return AskMixer(self.key, self.batch)

    def on_grant(self, grant: Grant, now: float) -> None:
        """Mixer answered the ask. The grant's validity is counted from when
        the ask was sent, so that it ends no later than Mixer's window does."""
        self.inflight = False
        self.unreachable = False
        end = self.asked_at + grant.valid_for
        if now >= self.window_end:
            self._roll(now)
        if now >= self.window_end:
            self.tokens, self.window_end = grant.granted, end
        elif end - self.window_end > self.unit_seconds / 2:
            # Mixer has moved on to its next window while ours still runs
            self.next_tokens += grant.granted
            self.next_end = end
        else:
            self.tokens += grant.granted
            self.window_end = min(self.window_end, end)
        if grant.exhausted:
            self.exhausted_until = end

    def on_failure(self, now: float) -> None:
        self.inflight = False
        self.unreachable = True
        self.retry_at = now + self.retry_interval


# ---------------------------------------------------------------- global, Mixer side


class GlobalQuota:
    """Mixer's counter for one quota key (rules 8-9)."""

    __slots__ = ("limit", "unit", "max_grant", "window", "used", "seen", "seen_before")

    def __init__(self, limit: int, unit: str | float = "SECOND") -> None:
        if limit < 1:
            raise RateLimitConfigError(f"global.requestsPerUnit must be at least 1, got {limit}")
        self.limit = limit
        self.unit = _unit_seconds(unit) if isinstance(unit, str) else float(unit)
        self.max_grant = max(1, math.ceil(limit * 0.1))
        self.window = -1
        self.used = 0
        self.seen: set[str] = set()
        self.seen_before: set[str] = set()

    def _roll(self, now: float) -> None:
        w = int(now // self.unit)
        if w != self.window:
            self.seen_before = self.seen if w == self.window + 1 else set()
            self.seen = set()
            self.window = w
            self.used = 0

    def grant(self, proxy: str, tokens: int, now: float) -> Grant:
        self._roll(now)
        self.seen.add(proxy)
        remaining = self.limit - self.used
        proxies = len(self.seen | self.seen_before) if self.seen_before else len(self.seen)
        fair = -(-remaining // proxies) if remaining > 0 else 0
        give = max(0, min(tokens, self.max_grant, fair, remaining))
        self.used += give
        return Grant(granted=give, valid_for=(self.window + 1) * self.unit - now, exhausted=self.used >= self.limit)

    def remaining(self, now: float) -> int:
        self._roll(now)
        return self.limit - self.used


# ---------------------------------------------------------------- a RateLimit resource


def _glob(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _matches(m: RateLimitMatch | None, path: str, method: str, principal: str | None) -> bool:
    if m is None:
        return True
    if m.paths and not any(_glob(p, path) for p in m.paths):
        return False
    if m.methods and method not in m.methods:
        return False
    if m.principals:
        if principal is None:
            return False
        p = principal[len("spiffe://"):] if principal.startswith("spiffe://") else principal
        if not any(_glob(x, p) for x in m.principals):
            return False
    return True


class _Limits:
    __slots__ = ("bucket", "quota")

    def __init__(self, bucket: TokenBucket | None, quota: QuotaBatcher | None) -> None:
        self.bucket = bucket
        self.quota = quota


class RateLimiter:
    """The decisions of one RateLimit resource for one sidecar (rules 10-11)."""

    def __init__(self, name: str, spec: RateLimit, now: float) -> None:
        self.name = name
        self.batchers: dict[str, QuotaBatcher] = {}

        def quota(g: GlobalRateLimit | None, key: str) -> QuotaBatcher | None:
            if g is None:
                return None
            b = QuotaBatcher(key, g.requests_per_unit, g.unit, failure_mode_deny=g.failure_mode_deny)
            self.batchers[key] = b
            return b

        top_bucket = bucket_from(spec.local, now) if spec.local is not None else None
        top_quota = quota(spec.global_, name)
        self._top = _Limits(top_bucket, top_quota)
        self._rules: list[tuple[RateLimitMatch | None, _Limits]] = []
        for i, rule in enumerate(spec.rules):
            key = f"{name}/{rule.name or i}"
            bucket = bucket_from(rule.local, now) if rule.local is not None else top_bucket
            q = quota(rule.global_, key) if rule.global_ is not None else top_quota
            self._rules.append((rule.match, _Limits(bucket, q)))

    def check(
        self, *, path: str, method: str = "GET", principal: str | None = None, now: float
    ) -> Allowed | Limited | WaitForGrant:
        """Decide one inbound request. After it, ``asks(now)`` says what to ask Mixer for."""
        q = path.find("?")
        if q >= 0:
            path = path[:q]
        limits = self._top
        for match, lim in self._rules:
            if _matches(match, path, method, principal):
                limits = lim
                break
        result: Allowed | Limited | WaitForGrant = ALLOWED
        if limits.bucket is not None:
            result = limits.bucket.take(now)
            if isinstance(result, Limited):
                return result
        if limits.quota is not None:
            g = limits.quota.take(now)
            if not isinstance(g, Allowed):
                if isinstance(g, WaitForGrant) and limits.bucket is not None:
                    limits.bucket.refund(1)  # not served yet: check() again after the wait
                return g
        return result

    def asks(self, now: float) -> list[AskMixer]:
        """Asks to send to Mixer now (usually none)."""
        out = []
        for b in self.batchers.values():
            a = b.need(now)
            if a is not None:
                out.append(a)
        return out

    def batcher(self, key: str) -> QuotaBatcher:
        return self.batchers[key]
