"""A route's retry policy, from Istio's HTTPRetry and the mesh's defaults: once per config.

``retry_policy(retries, settings)`` carries out rules 1-4 of core/retry.py (the
default policy, ``attempts <= 0``, ``retryOn`` with its conditions and status
codes, unknown conditions as errors); core/retry.py's ``decide`` then uses the
policy after every try. Interpreted on purpose: setup.py compiles core/retry.py
(per try) and leaves this module out, so the compiled library every sidecar
keeps resident does not carry code that runs once per config.
"""

from __future__ import annotations

from typing import Final

from ..model.istio import HTTPRetry
from ..model.proxyconfig import Settings
from .retry import GRPC_RETRY_CONDITIONS, NO_RETRY, RetryConfigError, RetryPolicy

__all__ = ["retry_policy", "parse_retry_on", "KNOWN_RETRY_ON"]

KNOWN_RETRY_ON: Final[frozenset[str]] = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "refused-stream",
        "retriable-4xx",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "http3-post-connect-failure",
        *GRPC_RETRY_CONDITIONS,
    }
)


def parse_retry_on(text: str) -> tuple[frozenset[str], frozenset[int]]:
    """Split a retryOn string into (conditions, status codes).

    ``"503,connect-failure"`` → ({"connect-failure", "retriable-status-codes"}, {503}).
    """
    conditions: set[str] = set()
    codes: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.isdigit():
            code = int(item)
            if not 100 <= code <= 599:
                raise RetryConfigError(f"retryOn: {item!r} is not an HTTP status code (100-599)")
            codes.add(code)
        elif item in KNOWN_RETRY_ON:
            conditions.add(item)
        else:
            known = ", ".join(sorted(KNOWN_RETRY_ON))
            raise RetryConfigError(f"retryOn: {item!r} is not a retry condition (known: {known}, or a status code)")
    if codes:
        conditions.add("retriable-status-codes")
    return frozenset(conditions), frozenset(codes)


def retry_policy(retries: HTTPRetry | None, settings: Settings) -> RetryPolicy:
    """The policy for a route: Istio's default when ``retries`` is None."""
    if retries is None:
        if settings.default_retry_attempts <= 0:
            return NO_RETRY
        conditions, codes = parse_retry_on(settings.default_retry_on)
        return RetryPolicy(
            attempts=settings.default_retry_attempts,
            per_try_timeout=None,
            retry_on=conditions,
            retriable_status_codes=codes or frozenset({503}),
        )
    if retries.attempts <= 0:
        return NO_RETRY
    if retries.retry_on is not None and retries.retry_on.strip():
        conditions, codes = parse_retry_on(retries.retry_on)
    else:
        conditions, default_codes = parse_retry_on(settings.default_retry_on)
        codes = default_codes or frozenset({503})
    per_try = retries.per_try_timeout
    if per_try is not None and per_try < 0:
        raise RetryConfigError(f"perTryTimeout must not be negative, got {float(per_try)}s")
    return RetryPolicy(
        attempts=retries.attempts,
        per_try_timeout=float(per_try) if per_try else None,
        retry_on=conditions,
        retriable_status_codes=codes,
        retry_remote_localities=bool(retries.retry_remote_localities),
    )
