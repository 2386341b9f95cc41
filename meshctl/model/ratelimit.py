"""meshctl's own rate-limit kind: ``RateLimit`` in API group ``meshctl.io/v1alpha1``.

Istio has no API for rate limits (it tells users to write EnvoyFilters), so
meshctl adds one kind, in Istio's style, that the reflective loader reads
like any Istio resource::

    apiVersion: meshctl.io/v1alpha1
    kind: RateLimit
    metadata: {name: ratings-limit}
    spec:
      selector: {matchLabels: {app: ratings}}     # the workloads whose inbound traffic is limited
      local:                                      # per sidecar, Envoy's local rate limit token bucket
        tokenBucket: {maxTokens: 10, tokensPerFill: 10, fillInterval: 1s}
      global:                                     # mesh-wide, counted by Mixer's quota service
        requestsPerUnit: 100
        unit: SECOND                              # SECOND | MINUTE | HOUR | DAY
        failureModeDeny: false                    # Mixer unreachable: allow (false) or deny (true)
      rules:                                      # first match wins; its settings replace the
      - name: reviews-ratings                     # top-level ones for the parts it sets
        match: {paths: ["/ratings/*"], principals: ["cluster.local/ns/default/sa/reviews"]}
        local: {tokenBucket: {maxTokens: 2, tokensPerFill: 2, fillInterval: 1s}}

Token-bucket fields and defaults follow Envoy's local rate limit:
``maxTokens`` is the burst; every ``fillInterval`` (required) adds
``tokensPerFill`` (default 1) tokens, up to ``maxTokens``. Limited requests
get 429 with ``x-ratelimit-*`` headers and ``Retry-After``.

Matching (``RateLimitMatch``): every listed field must match; within a field
any entry. ``paths`` and ``principals`` take Istio's AuthorizationPolicy
forms: exact, ``prefix*``, ``*suffix`` or ``*``; ``methods`` are exact.
Principals are SPIFFE IDs without ``spiffe://``, as in AuthorizationPolicy.

Importing this module registers the kind in ``model.istio.SPEC_TYPES``
(``meshctl.model`` imports it, so any import of the model does).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Duration
from .istio import SPEC_TYPES, WorkloadSelector

__all__ = [
    "TokenBucketSettings",
    "LocalRateLimit",
    "GlobalRateLimit",
    "RateLimitMatch",
    "RateLimitRule",
    "RateLimit",
    "RATE_LIMIT_UNITS",
    "ratelimit_problems",
]

RATE_LIMIT_UNITS: dict[str, float] = {"SECOND": 1.0, "MINUTE": 60.0, "HOUR": 3600.0, "DAY": 86400.0}


@dataclass(frozen=True, slots=True)
class TokenBucketSettings:
    max_tokens: int = 0
    tokens_per_fill: int | None = None  # Envoy's default: 1
    fill_interval: Duration | None = None  # required


@dataclass(frozen=True, slots=True)
class LocalRateLimit:
    token_bucket: TokenBucketSettings | None = None


@dataclass(frozen=True, slots=True)
class GlobalRateLimit:
    requests_per_unit: int = 0
    unit: str = "SECOND"  # SECOND | MINUTE | HOUR | DAY
    failure_mode_deny: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitMatch:
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    name: str | None = None
    match: RateLimitMatch | None = None  # None: matches every request
    local: LocalRateLimit | None = None
    global_: GlobalRateLimit | None = None  # "global" in YAML


@dataclass(frozen=True, slots=True)
class RateLimit:
    selector: WorkloadSelector | None = None  # None: every workload in the namespace
    local: LocalRateLimit | None = None
    global_: GlobalRateLimit | None = None  # "global" in YAML
    rules: tuple[RateLimitRule, ...] = ()


SPEC_TYPES[("meshctl.io", "RateLimit")] = RateLimit


def _local_problems(local: LocalRateLimit, where: str) -> list[str]:
    tb = local.token_bucket
    if tb is None:
        return [f"{where}.tokenBucket: required"]
    out = []
    if tb.max_tokens < 1:
        out.append(f"{where}.tokenBucket.maxTokens: must be at least 1, got {tb.max_tokens}")
    if tb.tokens_per_fill is not None and tb.tokens_per_fill < 1:
        out.append(f"{where}.tokenBucket.tokensPerFill: must be at least 1, got {tb.tokens_per_fill}")
    if tb.fill_interval is None:
        out.append(f"{where}.tokenBucket.fillInterval: required")
    elif tb.fill_interval < 0.001:
        out.append(f"{where}.tokenBucket.fillInterval: must be at least 1ms, got {float(tb.fill_interval)}s")
    return out


def _global_problems(g: GlobalRateLimit, where: str) -> list[str]:
    out = []
    if g.requests_per_unit < 1:
        out.append(f"{where}.requestsPerUnit: must be at least 1, got {g.requests_per_unit}")
    if g.unit not in RATE_LIMIT_UNITS:
        out.append(f"{where}.unit: {g.unit!r} is not one of {', '.join(RATE_LIMIT_UNITS)}")
    return out


def ratelimit_problems(spec: RateLimit) -> list[str]:
    """Meaning errors in a RateLimit spec (the loader has checked shapes), each naming its field."""
    out: list[str] = []
    if spec.local is None and spec.global_ is None and not spec.rules:
        out.append("spec: at least one of local, global or rules must be set")
    if spec.local is not None:
        out += _local_problems(spec.local, "spec.local")
    if spec.global_ is not None:
        out += _global_problems(spec.global_, "spec.global")
    for i, rule in enumerate(spec.rules):
        where = f"spec.rules[{i}]"
        if rule.local is None and rule.global_ is None:
            out.append(f"{where}: at least one of local or global must be set")
        if rule.local is not None:
            out += _local_problems(rule.local, f"{where}.local")
        if rule.global_ is not None:
            out += _global_problems(rule.global_, f"{where}.global")
        for field in ("paths", "principals"):
            for j, p in enumerate(getattr(rule.match, field) if rule.match else ()):
                if not p or "*" in p[1:-1] or p.count("*") > 1:
                    out.append(f"{where}.match.{field}[{j}]: {p!r}: use exact, prefix*, *suffix or *")
    return out
