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
