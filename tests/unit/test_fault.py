"""Fault injection: Istio's Bookinfo fault rules, percentages drawn from an injected Random."""

from __future__ import annotations

import random

from meshctl.core.fault import NO_FAULT, decide_fault
from meshctl.model.base import Duration
from meshctl.model.istio import FaultAbort, FaultDelay, HTTPFaultInjection, Percent


class Scripted(random.Random):
    """A Random whose random() returns chosen values, in order."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:  # type: ignore[override]
        return self.values.pop(0)


# virtual-service-ratings-test-delay.yaml: 7s delay for jason, 100%
RATINGS_TEST_DELAY = HTTPFaultInjection(delay=FaultDelay(fixed_delay=Duration(7.0), percentage=Percent(100.0)))
# virtual-service-ratings-test-abort.yaml: HTTP 500 for jason, 100%
RATINGS_TEST_ABORT = HTTPFaultInjection(abort=FaultAbort(http_status=500, percentage=Percent(100.0)))


def test_no_fault_block_injects_nothing() -> None:
    d = decide_fault(None, random.Random(1))
    assert d is NO_FAULT and not d and d.delay is None and not d.aborts


def test_bookinfo_ratings_delay_delays_every_request_7s() -> None:
    rand = random.Random(42)
    for _ in range(1000):
        d = decide_fault(RATINGS_TEST_DELAY, rand)
        assert d.delay == 7.0 and d.abort_status is None


def test_bookinfo_ratings_abort_answers_500_to_every_request() -> None:
    rand = random.Random(42)
    for _ in range(1000):
        d = decide_fault(RATINGS_TEST_ABORT, rand)
        assert d.abort_status == 500 and d.delay is None and d.aborts


def test_missing_percentage_faults_all_requests() -> None:
    fault = HTTPFaultInjection(
        delay=FaultDelay(fixed_delay=Duration(0.5)), abort=FaultAbort(http_status=503)
    )
    # even the draw closest to 1 is faulted
    d = decide_fault(fault, Scripted([0.9999999, 0.9999999]))
    assert d.delay == 0.5 and d.abort_status == 503


def test_ten_percent_over_10000_seeded_draws_is_within_bound() -> None:
    fault = HTTPFaultInjection(abort=FaultAbort(http_status=503, percentage=Percent(10.0)))
    rand = random.Random(20261126)
    aborted = sum(1 for _ in range(10_000) if decide_fault(fault, rand).abort_status == 503)
    # binomial(10000, 0.1): sd = 30; allow 5 sd
    assert 850 <= aborted <= 1150, aborted


def test_fractional_percentage_one_in_a_thousand() -> None:
    fault = HTTPFaultInjection(delay=FaultDelay(fixed_delay=Duration(1.0), percentage=Percent(0.1)))
    rand = random.Random(7)
    delayed = sum(1 for _ in range(100_000) if decide_fault(fault, rand).delay is not None)
    # binomial(100000, 0.001): mean 100, sd ~10
    assert 50 <= delayed <= 150, delayed


def test_boundary_draws_are_exact() -> None:
    fault = HTTPFaultInjection(abort=FaultAbort(http_status=503, percentage=Percent(10.0)))
    assert decide_fault(fault, Scripted([0.0999999999])).abort_status == 503
    assert decide_fault(fault, Scripted([0.1])).abort_status is None  # r < 10/100, not <=
    zero = HTTPFaultInjection(abort=FaultAbort(http_status=503, percentage=Percent(0.0)))
    assert decide_fault(zero, Scripted([0.0])) is NO_FAULT
    hundred = HTTPFaultInjection(abort=FaultAbort(http_status=503, percentage=Percent(100.0)))
    assert decide_fault(hundred, Scripted([0.9999999999999999])).abort_status == 503


def test_deprecated_integer_percent_is_used_when_percentage_absent() -> None:
    fault = HTTPFaultInjection(delay=FaultDelay(fixed_delay=Duration(2.0), percent=25))
    assert decide_fault(fault, Scripted([0.2499])).delay == 2.0
    assert decide_fault(fault, Scripted([0.25])) is NO_FAULT
    # percentage wins over percent
    both = HTTPFaultInjection(delay=FaultDelay(fixed_delay=Duration(2.0), percent=100, percentage=Percent(0.0)))
    assert decide_fault(both, Scripted([0.0])) is NO_FAULT


def test_delay_and_abort_are_drawn_independently() -> None:
    fault = HTTPFaultInjection(
        delay=FaultDelay(fixed_delay=Duration(1.0), percentage=Percent(50.0)),
        abort=FaultAbort(http_status=400, percentage=Percent(50.0)),
    )
    # first draw decides the delay, second the abort
    d = decide_fault(fault, Scripted([0.1, 0.9]))
    assert d.delay == 1.0 and d.abort_status is None
    d = decide_fault(fault, Scripted([0.9, 0.1]))
    assert d.delay is None and d.abort_status == 400
    d = decide_fault(fault, Scripted([0.1, 0.1]))
    assert d.delay == 1.0 and d.abort_status == 400
    # over many seeded draws all four combinations occur about equally often
    rand = random.Random(3)
    combos: dict[tuple[bool, bool], int] = {}
    for _ in range(8000):
        d = decide_fault(fault, rand)
        key = (d.delay is not None, d.abort_status is not None)
        combos[key] = combos.get(key, 0) + 1
    assert set(combos) == {(False, False), (False, True), (True, False), (True, True)}
    assert all(1800 <= n <= 2200 for n in combos.values()), combos


def test_same_seed_same_decisions() -> None:
    fault = HTTPFaultInjection(
        delay=FaultDelay(fixed_delay=Duration(1.0), percentage=Percent(30.0)),
        abort=FaultAbort(http_status=503, percentage=Percent(30.0)),
    )
    a, b = random.Random(99), random.Random(99)
    assert [decide_fault(fault, a) for _ in range(200)] == [decide_fault(fault, b) for _ in range(200)]


def test_grpc_abort() -> None:
    fault = HTTPFaultInjection(abort=FaultAbort(grpc_status="UNAVAILABLE", percentage=Percent(100.0)))
    d = decide_fault(fault, random.Random(0))
    assert d.grpc_status == "UNAVAILABLE" and d.abort_status is None and d.aborts

