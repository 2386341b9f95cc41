"""Mixer's aggregation (deltas, restarts, windows, percentiles) and the `top` table."""

from __future__ import annotations

from rich.console import Console

from meshctl.cli.mixer import render_top, sort_rows
from meshctl.mixer.aggregate import Aggregator, parse_samples, quantile
from meshctl.mixer.server import Mixer, parse_window
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Endpoint, Workload
from meshctl.proxy.telemetry import DURATION_BUCKETS_MS, Telemetry

import pytest

REVIEWS = "reviews.default.svc.cluster.local"
PP = Workload(name="productpage-v1-0", service="productpage", labels=FrozenDict(app="productpage", version="v1"))
EP = {v: Endpoint(address="127.0.0.1", port=9000 + i, labels=FrozenDict(app="reviews", version=v), instance=f"reviews-{v}-0")
      for i, v in enumerate(("v1", "v2"))}


def traffic(tel: Telemetry, version: str, n: int, status: int = 200, ms: float = 3.0, flags=()) -> None:
    for _ in range(n):
        tel.record_http(tel.http_labels(inbound=False, peer=None, endpoint=EP[version], service=REVIEWS,
                                        status=status, flags=list(flags)), ms, 0, 10)


def test_parse_samples_reads_labels_with_escapes():
    s = parse_samples('# HELP x\nistio_requests_total{a="x\\"y",b="1"} 3\nmeshctl_other 5\nistio_x 2.5\n')
    assert s[("istio_requests_total", (("a", 'x"y'), ("b", "1")))] == 3
    assert s[("istio_x", ())] == 2.5
    assert len(s) == 2


def test_quantile_interpolates_like_prometheus():
    # 100 observations: 50 in (0, 0.5], 50 in (1, 5]
    b = [0.0] * (len(DURATION_BUCKETS_MS) + 1)
    for i, le in enumerate(DURATION_BUCKETS_MS):
        b[i] = 50 if le < 5 else 100
    b[-1] = 100
    assert quantile(0.5, b) == 0.5
    assert quantile(0.75, b) == pytest.approx(3.0)  # halfway through (1, 5]
    assert quantile(0.99, b) == pytest.approx(4.92)
    assert quantile(0.5, [0.0] * len(b)) is None


def test_window_rates_errors_and_percentiles_from_deltas():
    tel = Telemetry(PP)
    agg = Aggregator()
    traffic(tel, "v1", 100, ms=3.0)  # before the first scrape: history, not in any window
    agg.ingest("pp", tel.render())
    agg.snapshot(0.0)
    traffic(tel, "v1", 18, ms=30.0)
    traffic(tel, "v1", 2, status=503, ms=30.0, flags=("UF",))
    traffic(tel, "v2", 5, status=503, flags=("UO",))
    agg.ingest("pp", tel.render())
    agg.snapshot(10.0)
    rows, covered = agg.top(10.0)
    assert covered == 10.0
    v1, v2 = rows
    assert (v1.service, v1.version, v1.requests, v1.errors) == (REVIEWS, "v1", 20, 2)
    assert v1.rps == pytest.approx(2.0)
    assert v1.success_rate == pytest.approx(0.9)
    assert 25 < v1.p50 <= 50 and v1.p99 <= 50
    assert (v2.requests, v2.overflows, v2.success_rate) == (5, 5, 0.0)
    # the mesh-wide totals keep everything
    assert "istio_requests_total" in agg.render()


def test_a_restarted_sidecar_is_not_counted_backwards_and_a_lost_one_not_twice():
    agg = Aggregator()
    a = Telemetry(PP)
    traffic(a, "v1", 10)
    agg.ingest("pp", a.render())
    agg.snapshot(0.0)
    agg.lost("pp", "ConnectError")
    agg.snapshot(1.0)
    traffic(a, "v1", 5)
    agg.ingest("pp", a.render())  # back, same process: only the 5 new ones
    agg.snapshot(2.0)
    b = Telemetry(PP)  # restarted: counters from zero
    traffic(b, "v1", 3)
    agg.ingest("pp", b.render())
    agg.snapshot(3.0)
    rows, _ = agg.top(3.0)
    assert rows[0].requests == 8
    total = [v for (n, lab), v in agg.totals.items() if n == "istio_requests_total"]
    assert total == [18]


def test_destination_reports_when_no_client_sidecar_did_and_rate_limits_count_there():
    server = Telemetry(Workload(name="ratings-v1-0", service="ratings", labels=FrozenDict(app="ratings", version="v1")))
    agg = Aggregator()
    agg.ingest("r", server.render())
    agg.snapshot(0.0)
    for status, flags in [(200, [])] * 10 + [(429, ["RL"])] * 30:
        server.record_http(server.http_labels(inbound=True, peer=None, endpoint=None, service=None, status=status,
                                              flags=flags), 1.0, 0, 0)
    agg.ingest("r", server.render())
    agg.snapshot(5.0)
    (row,), _ = agg.top(60)
    assert row.service == "ratings.default.svc.cluster.local" and row.version == "v1"
    assert (row.requests, row.rate_limited, row.rps) == (40, 30, 8.0)
    assert row.success_rate == 1.0  # 429 is not a server error


def test_gauges_are_summed_over_sidecars_that_answered():
    agg = Aggregator()
    g = '# TYPE meshctl_inbound_cx_active gauge\nmeshctl_inbound_cx_active{destination_service="%s",destination_version="v2"} %d\n'
    agg.ingest("a", g % (REVIEWS, 3))
    agg.ingest("b", g % (REVIEWS, 4))
    agg.snapshot(0.0)
    (row,), _ = agg.top(10)
    assert row.active_connections == 7
    agg.lost("b", "timeout")
    agg.snapshot(1.0)
    (row,), _ = agg.top(10)
    assert row.active_connections == 3


def test_quota_grants_are_fair_and_capped():
    m = Mixer()
    g = m.grant({"key": "default/rl", "proxy": "a", "tokens": 5, "limit": 10, "unit_seconds": 1}, now=100.2)
    assert g["granted"] == 1 and 0 < g["valid_for"] <= 0.8 + 1e-9  # batch cap: 10% of 10
    got = sum(m.grant({"key": "default/rl", "proxy": "a", "tokens": 1, "limit": 10, "unit_seconds": 1}, 100.3)["granted"]
              for _ in range(20))
    assert got == 9  # never more than the limit in one window
    assert m.grant({"key": "default/rl", "proxy": "a", "tokens": 1, "limit": 10, "unit_seconds": 1}, 101.0)["granted"] == 1


def test_parse_window():
    assert parse_window("10s") == 10 and parse_window("1m") == 60 and parse_window("500ms") == 0.5
    assert parse_window("2h") == 900  # capped
    with pytest.raises(ValueError, match="10s or 1m"):
        parse_window("soon")


DATA = {
    "window": 10.0, "covered": 10.0, "targets": 6, "failing": {},
    "rows": [
        {"service": REVIEWS, "version": "v1", "requests": 200, "rps": 20.0, "success_rate": 1.0, "p50": 2.1,
         "p90": 4.5, "p99": 9.8, "errors": 0, "active_connections": 3, "ejected_hosts": 0, "overflows": 0,
         "rate_limited": 0},
        {"service": REVIEWS, "version": "v2", "requests": 100, "rps": 10.0, "success_rate": 0.9, "p50": 12.0,
         "p90": 40.0, "p99": 2400.0, "errors": 10, "active_connections": 1, "ejected_hosts": 1, "overflows": 4,
         "rate_limited": 0},
        {"service": "ratings.default.svc.cluster.local", "version": "v1", "requests": 450, "rps": 45.0,
         "success_rate": 1.0, "p50": 0.7, "p90": 0.9, "p99": 1.0, "errors": 0, "active_connections": 12,
         "ejected_hosts": 0, "overflows": 0, "rate_limited": 123},
        {"service": "a-very-long-service-name-indeed.prod.svc.cluster.local", "version": "canary-2024",
         "requests": 0, "rps": 0.0, "success_rate": None, "p50": None, "p90": None, "p99": None, "errors": 0,
         "active_connections": 0, "ejected_hosts": 0, "overflows": 0, "rate_limited": 0},
    ],
}


def render(**kw) -> list[str]:
    con = Console(record=True, width=80, color_system=None)
    con.print(render_top(DATA, **kw))
    return con.export_text().splitlines()


def test_top_table_shows_the_numbers_and_fits_80_columns():
    lines = render(sort="rps")
    assert all(len(x) <= 80 for x in lines)
    header = next(x for x in lines if "SERVICE" in x)
    for col in ("RPS", "SUCC", "P50", "P90", "P99", "CONN", "EJECT", "UO", "RL"):
        assert col in header
    body = [x for x in lines if x.startswith(("reviews", "ratings", "a-very"))]
    assert body[0].split() == ["ratings", "v1", "45.0", "100%", "0.7ms", "0.9ms", "1.0ms", "12", "0", "0", "123"]
    assert body[1].split() == ["reviews", "v1", "20.0", "100%", "2.1ms", "4.5ms", "9.8ms", "3", "0", "0", "0"]
    assert body[2].split() == ["reviews", "v2", "10.0", "90.0%", "12ms", "40ms", "2.4s", "1", "1", "4", "0"]
    assert body[3].split()[2:] == ["0.0", "-", "-", "-", "-", "0", "0", "0", "0"]  # name cut, row intact


def test_top_sorting_and_filter():
    names = [(r["service"].split(".")[0], r["version"]) for r in sort_rows(DATA["rows"], "p99")]
    assert names[:3] == [("reviews", "v2"), ("reviews", "v1"), ("ratings", "v1")]
    assert sort_rows(DATA["rows"], "errors")[0]["version"] == "v2"
    lines = render(sort="name", service="reviews")
    body = [x.split()[:2] for x in lines if x.startswith(("reviews", "ratings", "a-very"))]
    assert body == [["reviews", "v1"], ["reviews", "v2"]]
    assert any("no traffic for nothing" in x for x in render(service="nothing"))


def test_mixer_finds_sidecars_and_gateways_in_the_state_dir(tmp_path):
    import json

    (tmp_path / "status.json").write_text(json.dumps({
        "workloads": [{"name": "web-v1-0", "admin_address": "127.0.0.1:41003", "state": "ready"},
                      {"name": "old-v1-0", "admin_address": "127.0.0.1:41009", "state": "stopped"}],
        "gateways": [{"name": "ingress", "address": "127.0.0.1:8080"}],
    }))
    (tmp_path / "ports.json").write_text(json.dumps({"ingress/admin": 41020, "web-v1-0/admin": 41003}))
    m = Mixer(tmp_path, {"extra": "127.0.0.1:5000"})
    assert m.discover() == {"extra": "127.0.0.1:5000", "web-v1-0": "127.0.0.1:41003", "ingress": "127.0.0.1:41020"}


def test_series_per_service_in_steps_for_the_dashboard_charts():
    tel = Telemetry(PP)
    agg = Aggregator()
    agg.ingest("pp", tel.render())
    agg.snapshot(0.0)
    for t in range(1, 21):  # a scrape a second; from t=11 reviews v2 fails half the time and gets slow
        traffic(tel, "v1", 2, ms=3.0)
        if t > 10:
            traffic(tel, "v2", 1, status=503, ms=300.0)
            traffic(tel, "v2", 1, ms=300.0)
        agg.ingest("pp", tel.render())
        agg.snapshot(float(t))
    covered, series = agg.series(span=20.0, step=5.0)
    assert covered == 20.0
    pts = series["reviews"]  # both versions, one service
    assert [p["age"] for p in pts] == [15.0, 10.0, 5.0, 0.0]
    assert pts[0]["rps"] == pytest.approx(2.0) and pts[0]["error_rate"] == 0.0 and pts[0]["p99"] <= 5
    assert pts[-1]["rps"] == pytest.approx(4.0) and pts[-1]["error_rate"] == pytest.approx(0.25)
    assert 250 < pts[-1]["p99"] <= 500
    assert Aggregator().series() == (0.0, {})
