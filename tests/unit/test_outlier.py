"""Outlier detection: ejection by consecutive errors, ejection time, limits, panic."""

from __future__ import annotations

import pytest

from meshctl.core.outlier import Eject, OutlierDetector, Uneject, outlier_config
from meshctl.model.base import Duration
from meshctl.model.istio import OutlierDetection

A, B, C, D = ("10.0.0.1", 9080), ("10.0.0.2", 9080), ("10.0.0.3", 9080), ("10.0.0.4", 9080)


def fail(det: OutlierDetector, host, n: int, now: float, status: int = 500):
    out = None
    for _ in range(n):
        out = det.record(host, status=status, now=now) or out
    return out


def test_istio_defaults() -> None:
    cfg = outlier_config(OutlierDetection())
    assert (cfg.consecutive_5xx, cfg.consecutive_gateway, cfg.interval, cfg.base_ejection_time) == (5, 0, 10.0, 30.0)
    assert (cfg.max_ejection_percent, cfg.min_health_percent, cfg.split_local_origin) == (10, 0, False)


def test_istio_circuit_breaking_task_ejects_after_one_5xx_for_three_minutes() -> None:
    od = OutlierDetection(
        consecutive_5xx_errors=1, interval=Duration(1.0), base_ejection_time=Duration(180.0), max_ejection_percent=100
    )
    det = OutlierDetector(od, [A, B])
    assert det.record(A, status=200, now=0.0) is None
    ej = det.record(A, status=503, now=1.0)
    assert isinstance(ej, Eject) and ej.host == A and ej.reason == "consecutive-5xx"
    assert ej.until == 181.0 and ej.duration == 180.0 and ej.times_ejected == 1
    assert det.eligible([A, B], now=2.0) == [B]
    assert det.eligible([A, B], now=180.9) == [B]
    assert det.tick(180.9) == []
    assert list(det.eligible([A, B], now=181.0)) == [A, B]
    assert det.tick(182.0) == [Uneject(host=A, at=181.0)]
    assert det.tick(183.0) == []


def test_default_five_consecutive_5xx_and_success_resets() -> None:
    det = OutlierDetector(OutlierDetection(max_ejection_percent=100), [A, B])
    assert fail(det, A, 4, 0.0) is None
    assert det.record(A, status=200, now=0.0) is None
    assert fail(det, A, 4, 0.0) is None
    assert det.status(0.0)[A].consecutive_5xx == 4
    ej = det.record(A, status=500, now=0.0)
    assert ej is not None and ej.reason == "consecutive-5xx"
    st = det.status(1.0)[A]
    assert st.ejected and st.until == 30.0 and st.ejections_total == 1 and st.consecutive_5xx == 0
    # 4xx are not errors
    assert fail(det, B, 20, 0.0, status=404) is None


def test_gateway_errors_only() -> None:
    od = OutlierDetection(consecutive_gateway_errors=3, consecutive_5xx_errors=0, max_ejection_percent=100)
    det = OutlierDetector(od, [A, B])
    assert fail(det, A, 10, 0.0, status=500) is None  # 500 is not a gateway error
    det.record(A, status=502, now=0.0)
    det.record(A, status=503, now=0.0)
    det.record(A, status=500, now=0.0)  # resets the gateway counter
    det.record(A, status=502, now=0.0)
    det.record(A, status=503, now=0.0)
    ej = det.record(A, status=504, now=0.0)
    assert ej is not None and ej.reason == "consecutive-gateway-errors"


def test_deprecated_consecutive_errors_means_gateway_errors() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_errors=2, max_ejection_percent=100), [A, B])
    assert fail(det, A, 20, 0.0, status=500) is None  # 5xx rule is off
    ej = fail(det, A, 2, 0.0, status=503)
    assert ej is not None and ej.reason == "consecutive-gateway-errors"
    # an explicit consecutive5xxErrors still applies
    det2 = OutlierDetector(OutlierDetection(consecutive_errors=2, consecutive_5xx_errors=3, max_ejection_percent=100), [A, B])
    assert fail(det2, A, 3, 0.0, status=500).reason == "consecutive-5xx"


def test_local_failures_count_as_5xx_when_not_split() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_gateway_errors=3, max_ejection_percent=100), [A, B])
    det.record(A, status=None, local_failure="connect-failure", now=0.0)
    det.record(A, status=None, local_failure="timeout", now=0.0)
    ej = det.record(A, status=None, local_failure="reset", now=0.0)
    assert ej is not None and ej.reason == "consecutive-gateway-errors"
    det.record(B, status=None, local_failure="connect-failure", now=0.0)
    assert det.status(0.0)[B].consecutive_5xx == 1


def test_split_local_origin_failures_have_their_own_counter() -> None:
    od = OutlierDetection(
        split_external_local_origin_errors=True, consecutive_local_origin_failures=2, max_ejection_percent=100
    )
    det = OutlierDetector(od, [A, B])
    assert det.record(A, status=None, local_failure="connect-failure", now=0.0) is None
    assert det.status(0.0)[A].consecutive_5xx == 0  # not a 5xx when split
    det.record(A, status=500, now=0.0)  # a response: the connection worked
    assert det.status(0.0)[A].consecutive_local_origin == 0
    assert det.record(A, status=None, local_failure="timeout", now=0.0) is None
    ej = det.record(A, status=None, local_failure="connect-failure", now=0.0)
    assert ej is not None and ej.reason == "consecutive-local-origin-failures"
    with pytest.raises(ValueError):
        det.record(B, status=None, now=0.0)


def test_ejection_time_grows_with_each_ejection_and_decays() -> None:
    od = OutlierDetection(consecutive_5xx_errors=1, interval=Duration(10.0), base_ejection_time=Duration(30.0),
                          max_ejection_percent=100)
    det = OutlierDetector(od, [A, B])
    det.tick(0.0)
    assert det.record(A, status=500, now=1.0).duration == 30.0
    det.tick(31.0)
    assert det.record(A, status=500, now=32.0).duration == 60.0  # ejected for the 2nd time
    det.tick(92.0)
    assert det.record(A, status=500, now=93.0).duration == 90.0
    # back in service, A is forgiven one step per full sweep interval
    assert det.tick(183.0) == [Uneject(A, 183.0)]
    det.tick(200.0)
    assert det.status(200.0)[A].times_ejected == 2
    det.tick(250.0)
    assert det.status(250.0)[A].times_ejected == 0
    assert det.record(A, status=500, now=251.0).duration == 30.0


def test_ejection_time_is_capped_at_300s() -> None:
    od = OutlierDetection(consecutive_5xx_errors=1, base_ejection_time=Duration(100.0), max_ejection_percent=100)
    det = OutlierDetector(od, [A, B])
    now, durations = 0.0, []
    for _ in range(6):
        ej = det.record(A, status=500, now=now)
        durations.append(ej.duration)
        now = ej.until  # no sweep in between: multiplier never decays
    assert durations == [100.0, 200.0, 300.0, 300.0, 300.0, 300.0]


def test_max_ejection_percent_default_10_still_ejects_one_host() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_5xx_errors=1), [A, B, C])
    assert det.record(A, status=500, now=0.0) is not None
    assert det.record(B, status=500, now=0.0) is None  # 2/3 > 10%
    assert det.refused_ejections == 1
    assert det.eligible([A, B, C], 1.0) == [B, C]


def test_max_ejection_percent_50() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=50), [A, B, C, D])
    assert det.record(A, status=500, now=0.0) is not None
    assert det.record(B, status=500, now=0.0) is not None
    assert det.record(C, status=500, now=0.0) is None
    assert det.eligible([A, B, C, D], 1.0) == [C, D]


def test_all_ejected_without_panic_leaves_no_host() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100), [A, B])
    det.record(A, status=500, now=0.0)
    det.record(B, status=500, now=0.0)
    assert det.eligible([A, B], 1.0) == []


def test_min_health_percent_panic_uses_all_hosts() -> None:
    od = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100, min_health_percent=50)
    det = OutlierDetector(od, [A, B, C, D])
    det.record(A, status=500, now=0.0)
    det.record(B, status=500, now=0.0)
    assert det.eligible([A, B, C, D], 1.0) == [C, D]  # 50% healthy: not below
    det.record(C, status=500, now=0.0)
    assert list(det.eligible([A, B, C, D], 1.0)) == [A, B, C, D]  # 25% < 50%: panic


def test_update_hosts_forgets_removed_hosts() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100), [A, B])
    det.record(A, status=500, now=0.0)
    det.update_hosts([B, C])
    assert set(det.status(1.0)) == {B, C}
    assert det.eligible([B, C], 1.0) == [B, C]
    assert det.next_tick is None


def test_next_tick() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100), [A, B])
    det.tick(0.0)
    assert det.next_tick == 10.0
    det.record(A, status=500, now=5.0)
    assert det.next_tick == 10.0
    det.tick(30.0)
    assert det.next_tick == 35.0


def test_eligible_with_endpoint_objects_and_reconfigure() -> None:
    from meshctl.model.proxyconfig import Endpoint

    eps = (Endpoint("10.0.0.1", 9080), Endpoint("10.0.0.2", 9080))
    det = OutlierDetector(OutlierDetection(max_ejection_percent=100), [A, B])
    assert det.eligible(eps, 0.0, key=lambda e: (e.address, e.port)) is eps  # nothing ejected: no copy
    det.reconfigure(OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100))
    det.record(A, status=500, now=0.0)
    assert det.eligible(eps, 1.0, key=lambda e: (e.address, e.port)) == [eps[1]]
