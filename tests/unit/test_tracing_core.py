"""core/tracing.py: sampling decisions and B3 / W3C trace-context propagation."""

from __future__ import annotations

import random

from meshctl.core.tracing import CLIENT, SERVER, begin, incoming, zipkin_json

BASE = [("host", "reviews:9080"), ("user-agent", "curl")]


def hdr(headers, name):
    vals = [v for k, v in headers if k == name]
    assert len(vals) <= 1, (name, vals)
    return vals[0] if vals else None


def test_no_context_at_100_percent_starts_a_trace_in_both_formats():
    out, spans = begin(list(BASE), 100.0, random.Random(1), 1_000, gateway=False, inbound=False)
    (sp,) = spans
    assert sp.kind == CLIENT and sp.parent_id is None and len(sp.trace_id) == 32 and len(sp.span_id) == 16
    assert hdr(out, "x-b3-traceid") == sp.trace_id and hdr(out, "x-b3-spanid") == sp.span_id
    assert hdr(out, "x-b3-sampled") == "1" and hdr(out, "x-b3-parentspanid") is None
    assert hdr(out, "traceparent") == f"00-{sp.trace_id}-{sp.span_id}-01"
    assert hdr(out, "host") == "reviews:9080"


def test_unsampled_request_costs_one_header_and_records_nothing():
    out, spans = begin(list(BASE), 0.0, random.Random(1), 0, gateway=False, inbound=True)
    assert spans == () and out == BASE + [("x-b3-sampled", "0")]


def test_rate_samples_about_that_share():
    rand = random.Random(7)
    n = sum(1 for _ in range(20_000) if begin(list(BASE), 1.0, rand, 0, gateway=False, inbound=True)[1])
    assert 140 <= n <= 260  # 1 % of 20,000 = 200


def test_caller_decision_wins_over_the_rate():
    inc = BASE + [("x-b3-traceid", "a" * 32), ("x-b3-spanid", "b" * 16), ("x-b3-sampled", "1")]
    out, (sp,) = begin(inc, 0.0, random.Random(1), 0, gateway=False, inbound=True)
    assert sp.kind == SERVER and sp.trace_id == "a" * 32 and sp.parent_id == "b" * 16
    assert hdr(out, "x-b3-parentspanid") == "b" * 16 and hdr(out, "x-b3-spanid") == sp.span_id
    denied = BASE + [("x-b3-traceid", "a" * 32), ("x-b3-spanid", "b" * 16), ("x-b3-sampled", "0")]
    out, spans = begin(denied, 100.0, random.Random(1), 0, gateway=False, inbound=True)
    assert spans == () and out == denied
    debug = BASE + [("x-b3-flags", "1")]
    assert begin(debug, 0.0, random.Random(1), 0, gateway=False, inbound=True)[1]


def test_w3c_traceparent_and_single_b3_are_read():
    tp = [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]
    assert incoming(tp) == ("1" * 32, "2" * 16, True, True)
    assert incoming([("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-00")])[2] is False
    assert incoming([("b3", "3" * 16 + "-" + "4" * 16 + "-1")]) == ("3" * 16, "4" * 16, True, True)
    assert incoming([("b3", "0")]) == (None, None, False, True)
    # a 64-bit B3 trace id is padded in the traceparent sent on
    out, (sp,) = begin([("x-b3-traceid", "5" * 16), ("x-b3-spanid", "6" * 16), ("x-b3-sampled", "1")], 0.0,
                       random.Random(1), 0, gateway=False, inbound=False)
    assert hdr(out, "traceparent") == f"00-{'0' * 16}{'5' * 16}-{sp.span_id}-01"
    # malformed ids start a new trace rather than propagate garbage
    assert incoming([("x-b3-traceid", "zz"), ("x-b3-spanid", "0" * 16)])[0] is None


def test_gateway_makes_a_server_span_and_a_client_child():
    out, (srv, cli) = begin(list(BASE), 100.0, random.Random(3), 5, gateway=True, inbound=False)
    assert (srv.kind, cli.kind) == (SERVER, CLIENT) and cli.parent_id == srv.span_id and srv.parent_id is None
    assert hdr(out, "x-b3-spanid") == cli.span_id and hdr(out, "x-b3-parentspanid") == srv.span_id


def test_zipkin_v2_json():
    _, (sp,) = begin([("x-b3-traceid", "a" * 32), ("x-b3-spanid", "b" * 16), ("x-b3-sampled", "1")], 0.0,
                     random.Random(1), 1234, gateway=False, inbound=True)
    d = zipkin_json(sp, name="ratings.default.svc.cluster.local:9080/*", service="ratings.default", duration_us=0,
                    tags={"http.status_code": "200"})
    assert d["traceId"] == "a" * 32 and d["parentId"] == "b" * 16 and d["kind"] == "SERVER"
    assert d["timestamp"] == 1234 and d["duration"] == 1 and d["localEndpoint"] == {"serviceName": "ratings.default"}


def test_single_b3_header_is_propagated_in_its_own_form():
    # sampled, with ids: the next hop gets one b3 header naming this proxy's span, its parent the caller's
    inc = BASE + [("b3", "a" * 32 + "-" + "b" * 16 + "-1")]
    out, (sp,) = begin(inc, 0.0, random.Random(1), 0, gateway=False, inbound=True)
    assert sp.trace_id == "a" * 32 and sp.parent_id == "b" * 16
    assert hdr(out, "b3") == f"{'a' * 32}-{sp.span_id}-1-{'b' * 16}"
    assert all(hdr(out, h) is None for h in ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled"))
    assert hdr(out, "traceparent") == f"00-{'a' * 32}-{sp.span_id}-01"
    # ids without a decision, sampled here: still one header
    out, (sp,) = begin(BASE + [("b3", "c" * 16 + "-" + "d" * 16)], 100.0, random.Random(1), 0,
                       gateway=False, inbound=False)
    assert hdr(out, "b3") == f"{'c' * 16}-{sp.span_id}-1-{'d' * 16}" and hdr(out, "x-b3-sampled") is None
    # ids without a decision, not sampled here: the decision is written into the single header
    out, spans = begin(BASE + [("b3", "c" * 16 + "-" + "d" * 16)], 0.0, random.Random(1), 0,
                       gateway=False, inbound=False)
    assert spans == () and hdr(out, "b3") == f"{'c' * 16}-{'d' * 16}-0" and hdr(out, "x-b3-sampled") is None
    # a deny-only b3 is passed on unchanged
    out, spans = begin(BASE + [("b3", "0")], 100.0, random.Random(1), 0, gateway=False, inbound=False)
    assert spans == () and out == BASE + [("b3", "0")]
    # a gateway: the single header names the client span, child of the server span
    out, (srv, cli) = begin(BASE + [("b3", "e" * 32 + "-" + "f" * 16 + "-1")], 0.0, random.Random(1), 0,
                            gateway=True, inbound=False)
    assert hdr(out, "b3") == f"{'e' * 32}-{cli.span_id}-1-{srv.span_id}" and srv.parent_id == "f" * 16


def test_otlp_json_groups_spans_by_service_with_otlp_kinds_ids_and_times():
    from meshctl.core.tracing import otlp_json

    _, (sp,) = begin([("x-b3-traceid", "a" * 16), ("x-b3-spanid", "b" * 16), ("x-b3-sampled", "1")], 0.0,
                     random.Random(1), 1_500_000, gateway=False, inbound=False)
    client = zipkin_json(sp, name="ratings.default.svc.cluster.local:9080/*", service="reviews.default",
                         duration_us=250, tags={"http.status_code": "503", "error": "true"},
                         remote_service="ratings.default")
    _, (srv,) = begin([], 100.0, random.Random(2), 7, gateway=False, inbound=True)
    server = zipkin_json(srv, name="x:80/*", service="ratings.default", duration_us=3, tags={})
    req = otlp_json([client, server], "1.0")
    rs = {r["resource"]["attributes"][0]["value"]["stringValue"]: r for r in req["resourceSpans"]}
    assert set(rs) == {"reviews.default", "ratings.default"}
    (o,) = rs["reviews.default"]["scopeSpans"][0]["spans"]
    assert o["traceId"] == "0" * 16 + "a" * 16 and o["spanId"] == sp.span_id and o["parentSpanId"] == "b" * 16
    assert o["kind"] == 3 and o["startTimeUnixNano"] == "1500000000" and o["endTimeUnixNano"] == "1500250000"
    assert o["status"] == {"code": 2}
    attrs = {a["key"]: a["value"]["stringValue"] for a in o["attributes"]}
    assert attrs["http.status_code"] == "503" and attrs["peer.service"] == "ratings.default"
    (o,) = rs["ratings.default"]["scopeSpans"][0]["spans"]
    assert o["kind"] == 2 and "parentSpanId" not in o and "status" not in o
