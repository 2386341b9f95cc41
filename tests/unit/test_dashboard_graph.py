"""mixer/graph.py: the dashboard's service graph from mesh-wide Istio counters."""

from meshctl.mixer.graph import EdgeHistory


def key(name, **labels):
    return (name, tuple(sorted(labels.items())))


def req(reporter, src, sver, dst, dver, code="200", mtls="unknown"):
    return key("istio_requests_total", reporter=reporter, source_app=src, source_version=sver,
               destination_service_name=dst, destination_service_namespace="default", destination_version=dver,
               response_code=code, connection_security_policy=mtls)


def test_edges_over_a_window_prefer_the_source_reporter_and_show_mtls():
    h = EdgeHistory()
    h.snapshot(0.0, {req("source", "reviews", "v3", "ratings", "v1"): 10,
                     req("destination", "reviews", "v3", "ratings", "v1", mtls="mutual_tls"): 10})
    h.snapshot(10.0, {req("source", "reviews", "v3", "ratings", "v1"): 60,
                      req("source", "reviews", "v3", "ratings", "v1", code="503"): 10,
                      req("destination", "reviews", "v3", "ratings", "v1", mtls="mutual_tls"): 60})
    (e,) = h.edges(10.0)
    assert (e["source"], e["target"]) == ("reviews v3", "ratings v1")
    assert e["requests"] == 60 and e["rps"] == 6.0 and abs(e["error_rate"] - 10 / 60) < 1e-9
    assert e["mtls"] is True and e["total"] == 70


def test_callers_outside_the_mesh_and_requests_that_reached_no_version():
    h = EdgeHistory()
    h.snapshot(0.0, {req("destination", "unknown", "unknown", "productpage", "v1"): 5,
                     req("source", "istio-ingressgateway", "unknown", "ratings", "unknown", code="500"): 3})
    pairs = {(e["source"], e["target"]): e for e in h.edges(10.0)}
    assert set(pairs) == {("unknown", "productpage v1"), ("istio-ingressgateway", "ratings")}
    assert pairs[("unknown", "productpage v1")]["mtls"] is False


def test_trace_list_groups_spans_newest_first_as_a_tree():
    from meshctl.mixer.dashboard import trace_list, traces_page

    def sp(tid, sid, parent, kind, svc, ts, dur=1000, err=False):
        d = {"traceId": tid, "id": sid, "kind": kind, "name": f"{svc}:9080/*", "timestamp": ts, "duration": dur,
             "localEndpoint": {"serviceName": svc}, "tags": {"http.status_code": "503" if err else "200"}}
        if err:
            d["tags"]["error"] = "true"
        if parent:
            d["parentId"] = parent
        return d

    spans = [
        sp("t1", "a", None, "SERVER", "productpage.default", 1_000_000, 5000),
        sp("t1", "b", "a", "CLIENT", "productpage.default", 1_001_000, 3000),
        sp("t1", "c", "b", "SERVER", "ratings.default", 1_002_000, 1000, err=True),
        sp("t2", "d", None, "SERVER", "ratings.default", 2_000_000),
        sp("t3", "e", None, "SERVER", "details.default", 3_000_000),
        sp("t1", "c", "b", "SERVER", "ratings.default", 1_002_000, 1000, err=True),  # the same span twice
    ]
    got = trace_list("ratings", spans)
    assert [t["id"] for t in got] == ["t2", "t1"]  # newest first; t3 never touched ratings
    t1 = got[1]
    assert [(d, s["id"]) for d, s in t1["spans"]] == [(0, "a"), (1, "b"), (2, "c")]
    assert t1["error"] and t1["duration"] == 5000 and t1["services"] == ["productpage.default", "ratings.default"]
    page = traces_page("ratings", got, 3)
    assert 'id="trace-t1"' in page and 'class="trace error"' in page and "<script" not in page
    assert trace_list("ratings.other", spans) == []
