"""Fault injection decisions: delay and abort a share of a route's requests.

Pure: the random source is passed in. The proxy calls ``decide_fault`` once
per request that matched a route with a ``fault`` block, sleeps
``decision.delay`` if set, then answers ``decision.abort_status`` (or, for a
gRPC request, ``grpc-status: decision.grpc_status``) instead of forwarding.

Rules (Istio's HTTPFaultInjection):

1. ``delay.fixedDelay`` delays the request; ``abort.httpStatus`` /
   ``abort.grpcStatus`` answers it locally. A block without its value
   (a delay with no fixedDelay, an abort with neither status) injects nothing.
2. The share of requests is ``percentage.value``, a float in [0, 100]
   (fractions allowed: 0.1 is one request in a thousand). The deprecated
   integer ``delay.percent`` is used only when ``percentage`` is absent.
   When neither is given, every request is faulted (Istio's documented
   behaviour: "if left unspecified, all requests will be delayed/aborted").
3. Delay and abort are drawn independently, delay first, one
   ``rand.random()`` each, and only for the parts that are configured, so a
   seeded Random gives a reproducible sequence. A request is faulted when
   ``rand.random() < value / 100``: 0 never faults, 100 always does.
4. Values out of range are clamped to [0, 100] here; loader/validate.py
   refuses them (and the other malformed blocks) before a rule is applied.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..model.istio import FaultAbort, FaultDelay, HTTPFaultInjection

__all__ = ["FaultDecision", "NO_FAULT", "decide_fault"]


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float | None = None  # seconds to wait before going on
    abort_status: int | None = None  # answer with this HTTP status instead of forwarding
    grpc_status: str | None = None  # for gRPC: answer with this grpc-status (name or number as configured)

    @property
    def aborts(self) -> bool:
        return self.abort_status is not None or self.grpc_status is not None

    def __bool__(self) -> bool:
        return self.delay is not None or self.aborts


NO_FAULT = FaultDecision()


def _share(percentage_value: float | None, percent: int | None) -> float:
    """Fraction in [0, 1] of requests to fault (rule 2)."""
    if percentage_value is not None:
        value = float(percentage_value)
    elif percent is not None:
        value = float(percent)
    else:
        return 1.0
    if value <= 0.0:
        return 0.0
    if value >= 100.0:
        return 1.0
    return value / 100.0


def _drawn(share: float, rand: random.Random) -> bool:
    if share >= 1.0:
        # Still consume a draw so that the sequence does not depend on the value.
        rand.random()
        return True
    return rand.random() < share


def decide_fault(fault: HTTPFaultInjection | None, rand: random.Random) -> FaultDecision:
    """What to inject into this request. ``NO_FAULT`` (falsy) when nothing."""
    if fault is None:
        return NO_FAULT
    delay: float | None = None
    abort_status: int | None = None
    grpc_status: str | None = None
    d = fault.delay
    if d is not None and d.fixed_delay is not None:
        pv = d.percentage.value if d.percentage is not None else None
        if _drawn(_share(pv, d.percent), rand):
            delay = float(d.fixed_delay)
    a = fault.abort
    if a is not None and (a.http_status is not None or a.grpc_status is not None):
        pv = a.percentage.value if a.percentage is not None else None
        if _drawn(_share(pv, None), rand):
            abort_status = a.http_status
            grpc_status = a.grpc_status
    if delay is None and abort_status is None and grpc_status is None:
        return NO_FAULT
    return FaultDecision(delay=delay, abort_status=abort_status, grpc_status=grpc_status)

