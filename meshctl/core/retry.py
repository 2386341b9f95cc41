"""Retry decisions: which failed tries are tried again, and after how long.

Pure: no clock, no sockets, no global random. After every try the proxy's
forwarder (proxy/forward.py) asks ``decide`` for one verdict:

    RetryAfter(seconds)   try again after this backoff (if the cluster's retry
                          budget, http.maxRetries, has room: the forwarder checks)
    PassOn                a response arrived and goes to the client as it is
    GiveUp                no response arrived and none will be tried for: the
                          proxy answers with its own failure reply

``should_retry`` and ``backoff`` are the two halves ``decide`` is made of.
A route's ``RetryPolicy`` is made once per config by core/retrypolicy.py
(``retry_policy``: rules 1-4), which setup.py leaves interpreted: this module,
compiled, holds what runs after every try.

Rules (Istio's HTTPRetry as translated to Envoy's retry policy):

1. A route with no ``retries`` gets Istio's default policy:
   ``Settings.default_retry_attempts`` retries on ``Settings.default_retry_on``,
   with retriable status codes {503}.
2. ``retries.attempts <= 0`` disables retries for the route.
3. ``retryOn`` is a comma-separated list of Envoy retry conditions; bare
   integers in it are retriable status codes (and imply
   ``retriable-status-codes``). When ``retryOn`` is given, it replaces the
   default conditions *and* the default status codes. When it is not given,
   the default conditions and {503} apply with the route's attempts.
4. Unknown condition names are a configuration error (Istio's validation
   rejects them); the error names the offending value.
5. A try is retried only while ``retries_done < attempts`` and the request
   body can be replayed (it was buffered whole).
6. What each condition covers (Envoy's ``retry_on``):
   ==========================  ==========================================
   5xx                         any 5xx response, connect failure, reset,
                               refused stream, per-try timeout
   gateway-error               502/503/504 responses, connect failure,
                               reset, refused stream, per-try timeout
   reset                       connect failure, reset, refused stream,
                               per-try timeout (no response arrived)
   connect-failure             connect failure
   refused-stream              HTTP/2 REFUSED_STREAM
   reset-before-request        connect failure, refused stream (the
                               upstream never saw the request)
   retriable-4xx               409 responses
   retriable-status-codes      responses whose status is in the policy's set
   cancelled / deadline-exceeded / internal / resource-exhausted /
   unavailable                 gRPC responses with grpc-status 1/4/13/8/14
   ==========================  ==========================================
   ``retriable-headers``, ``envoy-ratelimited`` and
   ``http3-post-connect-failure`` are accepted (Istio allows them) but never
   trigger a retry here: meshctl has no retriable-header config and no HTTP/3.
7. Backoff is Envoy's fully jittered exponential backoff:
   ``uniform(0, min(max_interval, base_interval * 2**retries_done))``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from ..dataclass_slots import DATACLASS_SLOTS
from .errors import CoreConfigError

__all__ = [
    "RetryPolicy",
    "Outcome",
    "RetryConfigError",
    "should_retry",
    "backoff",
    "decide",
    "Verdict",
    "RetryAfter",
    "PassOn",
    "GiveUp",
    "NO_RETRY",
    "GRPC_RETRY_CONDITIONS",
]


class RetryConfigError(CoreConfigError):
    """A retry policy that cannot be used; the message names the bad value."""


# gRPC status names Envoy accepts in retry_on, with their codes (retrypolicy.py lists them as known conditions).
GRPC_RETRY_CONDITIONS: Final[dict[str, int]] = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

# Failures the proxy reports in Outcome.failure.
_FAILURES: Final = frozenset({"connect-failure", "reset", "refused-stream", "timeout"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # retries after the first try (Istio's "attempts")
    per_try_timeout: float | None
    retry_on: frozenset[str]
    retriable_status_codes: frozenset[int]
    base_interval: float = 0.025
    max_interval: float = 0.25
    retry_remote_localities: bool = False  # retries leave tried locality levels out (core/locality.py rule 6)


NO_RETRY: Final = RetryPolicy(attempts=0, per_try_timeout=None, retry_on=frozenset(), retriable_status_codes=frozenset())


# Made after every try: writes its __init__ out (under mypyc the one dataclass()
# generates is interpreted Python), and so is not frozen; nothing changes one once made.
@dataclass(**DATACLASS_SLOTS)
class Outcome:
    status: int | None = None  # response status if one arrived
    failure: str | None = None  # "connect-failure" | "reset" | "refused-stream" | "timeout" (per try)
    grpc_status: int | None = None

    def __init__(self, status: int | None = None, failure: str | None = None, grpc_status: int | None = None) -> None:
        self.status = status
        self.failure = failure
        self.grpc_status = grpc_status


def _retriable(policy: RetryPolicy, outcome: Outcome) -> bool:
    on = policy.retry_on
    failure = outcome.failure
    if failure is not None:
        if failure not in _FAILURES:
            raise ValueError(f"unknown failure kind {failure!r}; expected one of {sorted(_FAILURES)}")
        if "5xx" in on or "gateway-error" in on or "reset" in on:
            return True
        if failure == "connect-failure":
            return "connect-failure" in on or "reset-before-request" in on
        if failure == "refused-stream":
            return "refused-stream" in on or "reset-before-request" in on
        return False
    status = outcome.status
    if status is not None:
        if status >= 500 and "5xx" in on:
            return True
        if status in (502, 503, 504) and "gateway-error" in on:
            return True
        if status == 409 and "retriable-4xx" in on:
            return True
        if "retriable-status-codes" in on and status in policy.retriable_status_codes:
            return True
    grpc = outcome.grpc_status
    if grpc is not None and grpc != 0:
        for name, code in GRPC_RETRY_CONDITIONS.items():
            if code == grpc and name in on:
                return True
    return False


def should_retry(policy: RetryPolicy, retries_done: int, outcome: Outcome, *, body_replayable: bool) -> bool:
    """Whether to try again after a try that ended with ``outcome``.

    ``retries_done`` counts retries already made (0 after the first try).
    """
    if retries_done >= policy.attempts or not body_replayable:
        return False
    return _retriable(policy, outcome)


def backoff(policy: RetryPolicy, retries_done: int, rand: random.Random) -> float:
    """Seconds to wait before retry number ``retries_done + 1`` (fully jittered)."""
    ceiling = policy.base_interval * (2 ** min(retries_done, 32))
    if ceiling > policy.max_interval:
        ceiling = policy.max_interval
    return rand.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Try again after ``seconds`` (the jittered backoff)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class PassOn:
    """The response that arrived goes to the client."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No response arrived and no further try will be made."""


Verdict = RetryAfter | PassOn | GiveUp

PASS_ON: Final = PassOn()
GIVE_UP: Final = GiveUp()


def decide(policy: RetryPolicy, retries_done: int, outcome: Outcome, *, body_replayable: bool,
           rand: random.Random) -> Verdict:
    """The one verdict after a try that ended with ``outcome``: RetryAfter(backoff)
    when the policy retries it, else PassOn for a response, GiveUp for a failure."""
    if should_retry(policy, retries_done, outcome, body_replayable=body_replayable):
        return RetryAfter(backoff(policy, retries_done, rand))
    return PASS_ON if outcome.failure is None else GIVE_UP
