"""Istio metrics rendering, source identity headers, and the access log file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import trio
from prometheus_client.parser import text_string_to_metric_families

from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Endpoint, Workload
from meshctl.proxy.accesslog import AccessLog, RotatingFile
from meshctl.proxy.telemetry import (
    DURATION_BUCKETS_MS,
    SOURCE_STAGE,
    Peer,
    Telemetry,
    _take_source,
    parse_source,
    workload_name,
)

PRODUCTPAGE = Workload(name="productpage-v1-0", service="productpage", labels=FrozenDict(app="productpage", version="v1"))
REVIEWS = Workload(name="reviews-v2-1", service="reviews", labels=FrozenDict(app="reviews", version="v2"))
EP = Endpoint(address="127.0.0.1", port=9000, labels=FrozenDict(app="reviews", version="v2"), instance="reviews-v2-1")


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def one(ss, **labels):
    got = [s for s in ss if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (labels, got)
    return got[0].value


def test_source_reporter_labels_come_from_self_and_the_picked_endpoint():
    tel = Telemetry(PRODUCTPAGE)
    svc = "reviews.default.svc.cluster.local"
    for _ in range(7):
        tel.record_http(tel.http_labels(inbound=False, peer=None, endpoint=EP, service=svc, status=200, flags=[]), 3.0, 0, 120)
    for _ in range(3):
        tel.record_http(tel.http_labels(inbound=False, peer=None, endpoint=EP, service=svc, status=503, flags=["UF"]), 12.0, 5, 20)
    s = samples(tel.render())
    ok = dict(reporter="source", response_code="200", response_flags="-", source_workload="productpage-v1",
              source_app="productpage", source_version="v1", destination_workload="reviews-v2",
              destination_service=svc, destination_service_name="reviews", destination_service_namespace="default",
              destination_app="reviews", destination_version="v2", request_protocol="http",
              connection_security_policy="unknown",
              source_principal="spiffe://cluster.local/ns/default/sa/productpage")
    assert one(s["istio_requests_total"], **ok) == 7
    assert one(s["istio_requests_total"], response_code="503", response_flags="UF") == 3
    # histogram: 7 observations of 3 ms are in le=5 but not le=1
    assert one(s["istio_request_duration_milliseconds_bucket"], response_code="200", le="1") == 0
    assert one(s["istio_request_duration_milliseconds_bucket"], response_code="200", le="5") == 7
    assert one(s["istio_request_duration_milliseconds_bucket"], response_code="503", le="10") == 0
    assert one(s["istio_request_duration_milliseconds_bucket"], response_code="503", le="25") == 3
    assert one(s["istio_request_duration_milliseconds_count"], response_code="503") == 3
    assert one(s["istio_request_duration_milliseconds_sum"], response_code="200") == 21
    assert one(s["istio_response_bytes_sum"], response_code="200") == 840
    assert one(s["istio_request_bytes_bucket"], response_code="503", le="10") == 3
    les = [x.labels["le"] for x in s["istio_request_duration_milliseconds_bucket"] if x.labels["response_code"] == "200"]
    assert les == [(str(b) if b != int(b) else str(int(b))) for b in DURATION_BUCKETS_MS] + ["+Inf"]


def test_destination_reporter_takes_the_source_from_headers():
    tel = Telemetry(REVIEWS)
    peer, _ = _take_source(Telemetry(PRODUCTPAGE).me_headers)
    tel.record_http(tel.http_labels(inbound=True, peer=peer, endpoint=None, service=None, status=429, flags=["RL"]), 1, 0, 0)
    tel.record_http(tel.http_labels(inbound=True, peer=None, endpoint=None, service=None, status=200, flags=[]), 1, 0, 0)
    s = samples(tel.render())
    assert one(s["istio_requests_total"], reporter="destination", source_workload="productpage-v1",
               source_app="productpage", source_version="v1", destination_workload="reviews-v2",
               destination_version="v2", destination_service="reviews.default.svc.cluster.local",
               response_code="429", response_flags="RL", connection_security_policy="none") == 1
    assert one(s["istio_requests_total"], source_workload="unknown", response_code="200") == 1


def test_tcp_counters_have_no_response_code():
    tel = Telemetry(PRODUCTPAGE)
    lab = tel.tcp_labels(inbound=False, peer=None, endpoint=EP, service="mysql.default.svc.cluster.local")
    st = tel.tcp_series(lab)
    st.opened += 2
    st.closed += 1
    st.sent += 100
    st.received += 7
    s = samples(tel.render())
    assert one(s["istio_tcp_connections_opened_total"], request_protocol="tcp", reporter="source") == 2
    assert one(s["istio_tcp_connections_closed_total"]) == 1
    assert one(s["istio_tcp_sent_bytes_total"]) == 100
    assert one(s["istio_tcp_received_bytes_total"]) == 7
    assert "response_code" not in s["istio_tcp_sent_bytes_total"][0].labels


def test_label_values_are_escaped():
    tel = Telemetry(Workload(name="odd", service="odd", labels=FrozenDict(app='a"b\\c', version="v1")))
    tel.record_http(tel.http_labels(inbound=False, peer=None, endpoint=None, service=None, status=404, flags=["NR"]), 1, 0, 0)
    s = samples(tel.render())
    assert one(s["istio_requests_total"], source_app='a"b\\c', destination_service="unknown", response_flags="NR") == 1


def test_workload_name_drops_the_replica_index():
    assert workload_name("reviews-v2-0") == "reviews-v2"
    assert workload_name("ingressgateway") == "ingressgateway"


def test_workload_name_of_a_shared_registry_id_is_the_same_workload_on_every_host():
    # Consul/Eureka ids name the host (supervisor/registration.py): Istio's workload label is
    # the deployment, the same for ratings-v1-0 of two hosts
    assert workload_name("ratings-v1-0@10.0.0.12:15006") == "ratings-v1"
    assert workload_name("ratings-v1-0@[fd00::2]:15006") == "ratings-v1"
    assert workload_name("istio-ingressgateway-80@10.0.0.11:8080") == "istio-ingressgateway"


def _rq(direction: str, headers, tel: Telemetry | None = None, peer_id: str | None = None):
    """A request on a listener of ``direction``, as the HTTP/1.1 loop makes it."""
    from meshctl.model.proxyconfig import Listener, ProxyConfig
    from meshctl.protocol.events import RequestHead
    from meshctl.proxy.request import Request
    from meshctl.proxy.snapshot import Snapshot
    from meshctl.proxy.stats import Stats

    listener = Listener(name=direction, direction=direction, address="10.0.0.2", port=15006, app_port=9080)
    cfg = ProxyConfig(version="t", workload=REVIEWS, listeners=(listener,))
    head = RequestHead("GET", "/", headers, authority="reviews")
    rt = SimpleNamespace(telemetry=tel if tel is not None else Telemetry(PRODUCTPAGE), access_log=None)
    return Request(head, listener, Snapshot(cfg, Stats()), rt, "10.0.0.9", SimpleNamespace(),
                   SimpleNamespace(), SimpleNamespace(peer_id=peer_id))


async def test_outbound_replaces_spoofed_source_headers_and_inbound_strips_them():
    rq = _rq("outbound", [("host", "reviews"), ("x-meshctl-source", "workload=evil"),
                          ("x-meshctl-source-workload", "evil")])
    await SOURCE_STAGE.on_request(rq)
    # one field carries the source's labels; what the app sent under either form is gone
    assert [k for k, _ in rq.headers] == ["host", "x-meshctl-source"]
    assert "evil" not in rq.headers[1][1]
    inbound = _rq("inbound", rq.headers)
    await SOURCE_STAGE.on_request(inbound)
    assert inbound.headers == [("host", "reviews")]
    assert inbound.peer.as_tuple() == ("productpage-v1", "default", "spiffe://cluster.local/ns/default/sa/productpage",
                                       "productpage", "v1")


def test_source_labels_with_any_characters_cross_in_one_header_and_come_back_the_same():
    labels = ("reviews-v2", "team;a=b", "spiffe://cluster.local/ns/team;a=b/sa/reviews", "reviews, ratings",
              "v2 %41 é")
    value = Peer(*labels).headers()
    assert len(value) == 1 and value[0][0] == "x-meshctl-source"
    assert value[0][1].isascii() and " " not in value[0][1] and "," not in value[0][1]
    assert parse_source(value[0][1]) == labels
    peer, rest = _take_source([("host", "x"), *value], Telemetry(REVIEWS))
    assert peer.as_tuple() == labels and rest == [("host", "x")]
    # a value not made by a sidecar: what can be read is, the rest is unknown
    assert parse_source("app=x;junk;version=;=y;other=z") == ("unknown", "unknown", "unknown", "x", "unknown")


def test_a_source_is_parsed_once_and_a_changed_source_is_seen():
    tel = Telemetry(REVIEWS)
    pp, ratings = Peer.of_workload(PRODUCTPAGE), Peer(workload="ratings-v1", app="ratings")
    first = tel.source_peer_of(pp.header_value())
    assert tel.source_peer_of(pp.header_value()) is first and first.workload == "productpage-v1"
    assert tel.source_peer_of(ratings.header_value()).workload == "ratings-v1"
    assert tel.source_peer_of(pp.header_value()) is first  # (source_peer's own reuse)


def test_the_five_headers_of_earlier_versions_are_still_read_and_taken_off():
    # a mesh across hosts runs two versions while it is upgraded: an older sidecar's source
    legacy = [("x-meshctl-source-workload", "productpage-v1"), ("x-meshctl-source-app", "productpage"),
              ("x-meshctl-source-version", "v1"), ("x-meshctl-source-namespace", "default"),
              ("x-meshctl-source-principal", "spiffe://cluster.local/ns/default/sa/productpage")]
    peer, rest = _take_source([("host", "reviews"), *legacy], Telemetry(REVIEWS))
    assert rest == [("host", "reviews")]
    assert peer.as_tuple() == Peer.of_workload(PRODUCTPAGE).as_tuple()
    # both forms: the one-field form counts
    peer, rest = _take_source([*legacy, ("host", "reviews"), *Peer(workload="ratings-v1").headers()])
    assert peer.workload == "ratings-v1" and peer.app == "unknown" and rest == [("host", "reviews")]


def test_rotating_file_rotates_at_the_size_limit(tmp_path):
    f = RotatingFile(tmp_path / "a.log", max_bytes=100, backups=2)
    line = b"x" * 39 + b"\n"  # 40 bytes
    for _ in range(12):
        f.write(line)
    f.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.log", "a.log.1", "a.log.2"]  # the oldest beyond 2 backups is gone
    for name in files:
        size = (tmp_path / name).stat().st_size
        assert size <= 100 and size % 40 == 0
    assert (tmp_path / "a.log.1").stat().st_size == 80


async def test_access_log_writes_json_lines_on_flush(tmp_path):
    al = AccessLog(tmp_path / "x.access.log", flush_interval=0.05)
    async with trio.open_nursery() as n:
        n.start_soon(al.run)
        al.write({"method": "GET", "path": "/a", "response_code": 200})
        al.write({"method": "POST", "path": "/b", "response_code": 503})
        with trio.move_on_after(15):  # flushed every 0.05 s; waited for, bounded, on a slow machine
            while al.written != 2:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    lines = (tmp_path / "x.access.log").read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == ["/a", "/b"]


async def test_a_busy_access_log_is_written_every_256_lines_not_held_for_the_interval(tmp_path):
    # a sidecar at a few thousand rps must not hold thousands of records in memory
    # between flushes: each pending record is a dict of ~20 fields (issue 12, RSS)
    al = AccessLog(tmp_path / "x.access.log", flush_interval=3600)
    async with trio.open_nursery() as n:
        n.start_soon(al.run)
        for i in range(256):
            al.write({"method": "GET", "path": f"/{i}", "response_code": 200})
        with trio.move_on_after(5):
            while al.written < 256:
                await trio.sleep(0.01)
        assert al.written == 256 and not al.pending
        n.cancel_scope.cancel()
    assert len((tmp_path / "x.access.log").read_text().splitlines()) == 256


async def test_a_big_access_log_flush_lets_the_connections_run_between_chunks(tmp_path):
    # encoding costs ~10 µs a record: 256 records in one step held a sidecar's every
    # connection for milliseconds (the latency tail at 1,000 rps; bench/tail_probe.sh)
    from meshctl.proxy.accesslog import ENCODE_CHUNK

    order: list[str] = []

    class Recorded(AccessLog):
        def _encode(self, records):
            order.append("encode")
            return super()._encode(records)

    al = Recorded(tmp_path / "x.access.log", flush_interval=3600)
    for i in range(10 * ENCODE_CHUNK):
        al.write({"method": "GET", "path": f"/{i}", "response_code": 200})
    flushing = True

    async def connection() -> None:
        while flushing:
            order.append("conn")
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        n.start_soon(connection)
        await trio.lowlevel.checkpoint()
        await al.flush()
        flushing = False
    encodes = [i for i, x in enumerate(order) if x == "encode"]
    assert len(encodes) == 10
    # trio runs each ready task once per batch, in either order: the connection had a turn in
    # every batch between the first chunk's and the last one's
    assert order[encodes[0]:encodes[-1]].count("conn") >= len(encodes) - 2
    lines = (tmp_path / "x.access.log").read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == [f"/{i}" for i in range(10 * ENCODE_CHUNK)]


async def test_an_access_log_flush_cancelled_while_encoding_keeps_its_records(tmp_path):
    from meshctl.proxy.accesslog import ENCODE_CHUNK

    al = AccessLog(tmp_path / "x.access.log", flush_interval=3600)
    for i in range(3 * ENCODE_CHUNK):
        al.write({"path": f"/{i}"})
    with trio.CancelScope() as cs:
        cs.cancel()
        await al.flush()
    al.write({"path": "/late"})
    assert [r["path"] for r in al.pending] == [f"/{i}" for i in range(3 * ENCODE_CHUNK)] + ["/late"]
    await al.flush()
    assert al.written == 3 * ENCODE_CHUNK + 1


async def test_an_idle_access_log_sleeps_until_a_record_then_flushes_after_the_interval(tmp_path, autojump_clock):
    # no timer while nothing waits: each wake-up of an idle loop costs a busy sidecar's next
    # request ~0.15 ms (bench/tail_probe.sh); a record still goes out one interval later
    al = AccessLog(tmp_path / "x.access.log", flush_interval=1.0)
    steps = 0

    class Count(trio.abc.Instrument):
        def after_task_step(self, task):
            nonlocal steps
            if task.name.endswith("AccessLog.run"):
                steps += 1

    trio.lowlevel.add_instrument(Count())
    async with trio.open_nursery() as n:
        n.start_soon(al.run)
        await trio.sleep(60)
        assert steps == 1  # started, then asleep for a minute
        al.write({"path": "/a"})
        await trio.sleep(0.99)
        assert al.written == 0  # held for the interval (the write itself runs in a thread)
        with trio.fail_after(30):
            while al.written < 1:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    assert json.loads((tmp_path / "x.access.log").read_text())["path"] == "/a"


def test_histogram_buckets_are_bisect_left_of_the_bounds():
    # a request lands in the first bucket whose bound it does not exceed (Prometheus' le)
    import bisect
    import math
    import random

    from meshctl.model.telemetry import BYTES_BUCKETS, DURATION_BUCKETS_MS
    from meshctl.proxy.telemetry import _bucket

    rand = random.Random(3)
    for buckets in (DURATION_BUCKETS_MS, BYTES_BUCKETS, (), (1.0,)):
        values = list(buckets) + [b + 0.5 for b in buckets] + [-1, 0, 0.0, 10**12, math.inf, math.nan]
        values += [rand.uniform(0, 2 * max(buckets, default=1)) for _ in range(200)] + [rand.randint(0, 10**9)]
        for v in values:
            assert _bucket(buckets, v) == bisect.bisect_left(buckets, v), (buckets, v)


def _inbound_request(tel: Telemetry, source: Workload, status: int, peer_id: str | None = None):
    """A finished request on an inbound listener, as the HTTP/1.1 loop hands it to finish_request."""
    rq = _rq("inbound", [("host", "reviews")] + Telemetry(source).me_headers, tel, peer_id)
    SOURCE_STAGE.decide(rq)
    rq.status = status
    return rq


def test_requests_of_sources_taking_turns_are_each_counted_under_their_own_source():
    from meshctl.proxy.telemetry import finish_request

    tel = Telemetry(REVIEWS)
    ratings = Workload(name="ratings-v1-0", service="ratings", labels=FrozenDict(app="ratings", version="v1"))
    turns = [(PRODUCTPAGE, 200), (PRODUCTPAGE, 503), (ratings, 200), (PRODUCTPAGE, 200), (ratings, 503),
             (ratings, 200), (PRODUCTPAGE, 503)]
    for src, status in turns:
        finish_request(_inbound_request(tel, src, status), 0.0, 0.001, 1.0)
    s = samples(tel.render())
    assert one(s["istio_requests_total"], source_workload="productpage-v1", response_code="200") == 2
    assert one(s["istio_requests_total"], source_workload="productpage-v1", response_code="503") == 2
    assert one(s["istio_requests_total"], source_workload="ratings-v1", response_code="200") == 2
    assert one(s["istio_requests_total"], source_workload="ratings-v1", response_code="503") == 1
    assert one(s["istio_requests_total"], source_app="ratings", source_version="v1", response_code="200") == 2


def test_a_verified_identity_is_recorded_for_its_own_request_only():
    # mTLS: the peer's verified SPIFFE ID is the source principal, not the header's; the
    # next request of the same source over plain TCP keeps the header's
    from meshctl.proxy.telemetry import finish_request

    tel = Telemetry(REVIEWS)
    verified = "spiffe://cluster.local/ns/other/sa/impostor"
    for peer_id in (None, verified, None, verified, None):
        finish_request(_inbound_request(tel, PRODUCTPAGE, 200, peer_id), 0.0, 0.001, 1.0)
    s = samples(tel.render())
    assert one(s["istio_requests_total"], source_principal=verified, connection_security_policy="mutual_tls",
               source_workload="productpage-v1") == 2
    assert one(s["istio_requests_total"], source_principal="spiffe://cluster.local/ns/default/sa/productpage",
               connection_security_policy="none") == 3
