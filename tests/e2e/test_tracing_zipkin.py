"""Distributed tracing end to end: Bookinfo under `meshctl up` with
``settings.tracing`` pointing at a REAL Zipkin server (Maven Central's exec jar,
tests/tools/servers.py), one request through the ingress gateway, and the trace
read back from Zipkin's API: one trace, every Bookinfo service in it, each span
a child of the span that called it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from .helpers import bookinfo_workdir
from .test_up_bookinfo import curl, meshctl

pytestmark = pytest.mark.e2e


def zipkin_get(base: str, path: str):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory, zipkin_server):
    work = tmp_path_factory.mktemp("bookinfo-traced")
    gw_port = bookinfo_workdir(work)
    text = (work / "mesh.yaml").read_text()
    text = text.replace("settings:\n", f"settings:\n  tracing: {{zipkin: '{zipkin_server}', sampling: 100}}\n", 1)
    (work / "mesh.yaml").write_text(text)
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    try:
        meshctl("route", "apply", "--wait", "-f", "rules/bookinfo-gateway.yaml", "-f", "rules/destination-rule-all.yaml",
                "-f", "rules/virtual-service-reviews-v3.yaml", cwd=work)
        yield {"dir": work, "gw": f"http://127.0.0.1:{gw_port}", "zipkin": zipkin_server.http}
    finally:
        meshctl("down", cwd=work, check=False)


def test_one_gateway_request_is_one_trace_across_bookinfo(traced_mesh):
    gw, zipkin = traced_mesh["gw"], traced_mesh["zipkin"]
    deadline = time.monotonic() + 30
    while curl(gw + "/productpage")[0] != 200:  # routes reach every proxy
        assert time.monotonic() < deadline, "productpage never answered 200 through the gateway"
        time.sleep(0.3)
    rid = "trace-test-0a1b2c3d"
    code, page = curl(gw + "/productpage", "-H", f"x-request-id: {rid}")
    assert code == 200 and 'color="red"' in page  # reviews-v3 called ratings

    query = f"/api/v2/traces?annotationQuery=guid:x-request-id%3D{rid}&limit=10"
    want = {"istio-ingressgateway.default", "productpage.default", "details.default", "reviews.default",
            "ratings.default"}
    traces: list = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # spans are sent in batches, about every second
        traces = zipkin_get(zipkin, query)
        if traces and want <= {s["localEndpoint"]["serviceName"] for s in traces[0]}:
            if len(traces[0]) >= 9:
                break
        time.sleep(0.5)
    assert len(traces) == 1, f"expected one trace for the request, got {len(traces)}: {json.dumps(traces)[:2000]}"
    spans = traces[0]
    services = {s["localEndpoint"]["serviceName"] for s in spans}
    assert services == want, services
    by_id = {s["id"]: s for s in spans}
    assert len({s["traceId"] for s in spans}) == 1

    def kinds(service):
        return sorted(s["kind"] for s in spans if s["localEndpoint"]["serviceName"] == service)

    # the gateway: server + client; productpage: server + one client per call (details, reviews);
    # reviews: server + client (ratings); the leaves: server only
    assert kinds("istio-ingressgateway.default") == ["CLIENT", "SERVER"]
    assert kinds("productpage.default") == ["CLIENT", "CLIENT", "SERVER"]
    assert kinds("reviews.default") == ["CLIENT", "SERVER"]
    assert kinds("details.default") == ["SERVER"] and kinds("ratings.default") == ["SERVER"]

    roots = [s for s in spans if "parentId" not in s]
    assert len(roots) == 1 and roots[0]["localEndpoint"]["serviceName"] == "istio-ingressgateway.default"
    assert roots[0]["kind"] == "SERVER"

    def parent(s):
        p = by_id[s["parentId"]]  # KeyError: a dangling parent link
        return p["localEndpoint"]["serviceName"], p["kind"]

    for s in spans:
        if s is roots[0]:
            continue
        svc, kind = s["localEndpoint"]["serviceName"], s["kind"]
        if svc == "istio-ingressgateway.default":
            assert parent(s) == ("istio-ingressgateway.default", "SERVER")
        elif kind == "SERVER":
            # a server span is the child of the client span that called it
            caller = {"productpage.default": "istio-ingressgateway.default", "details.default": "productpage.default",
                      "reviews.default": "productpage.default", "ratings.default": "reviews.default"}[svc]
            assert parent(s) == (caller, "CLIENT"), (svc, parent(s))
        else:
            # a client span is the child of its own service's server span (the app propagated it)
            assert parent(s) == (svc, "SERVER"), (svc, parent(s))
        assert s["timestamp"] >= by_id[s["parentId"]]["timestamp"] - 1000

    # Envoy's tags
    ratings = next(s for s in spans if s["localEndpoint"]["serviceName"] == "ratings.default")
    assert ratings["tags"]["http.status_code"] == "200"
    assert ratings["tags"]["response_flags"] == "-"
    assert ratings["tags"]["guid:x-request-id"] == rid
    assert ratings["tags"]["node_id"] == "ratings-v1-0"
    assert ratings["name"].startswith("ratings.default.svc.cluster.local:9080")
    assert ratings["tags"]["destination.principal"] == "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    rev_client = next(s for s in spans if s["localEndpoint"]["serviceName"] == "reviews.default" and s["kind"] == "CLIENT")
    assert rev_client["tags"]["upstream_cluster"].startswith("outbound|9080|")
    assert "ratings" in rev_client["tags"]["upstream_cluster"]


def test_a_single_b3_header_stays_single_and_joins_the_callers_trace(traced_mesh):
    """A caller that speaks B3's single-header form (``b3: trace-span-1``) gets its trace continued:
    the gateway's span is the child of the caller's span, and every hop passes one ``b3`` header on
    (the apps copy ``b3`` as Istio's Bookinfo apps do), so the whole request is still one trace."""
    gw, zipkin = traced_mesh["gw"], traced_mesh["zipkin"]
    deadline = time.monotonic() + 30
    while curl(gw + "/productpage")[0] != 200:
        assert time.monotonic() < deadline, "productpage never answered 200 through the gateway"
        time.sleep(0.3)
    trace_id, caller_span = "5b3e0c1d2e3f40516273849a5b6c7d8e", "00000000000000c1"
    code, _ = curl(gw + "/productpage", "-H", f"b3: {trace_id}-{caller_span}-1")
    assert code == 200
    want = {"istio-ingressgateway.default", "productpage.default", "details.default", "reviews.default",
            "ratings.default"}
    spans: list = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            spans = zipkin_get(zipkin, f"/api/v2/trace/{trace_id}")
        except urllib.error.HTTPError:  # 404 until the first batch arrives
            spans = []
        if len(spans) >= 9 and want <= {s["localEndpoint"]["serviceName"] for s in spans}:
            break
        time.sleep(0.5)
    assert want <= {s["localEndpoint"]["serviceName"] for s in spans}, json.dumps(spans)[:2000]
    gw_server = [s for s in spans if s["localEndpoint"]["serviceName"] == "istio-ingressgateway.default"
                 and s["kind"] == "SERVER"]
    assert len(gw_server) == 1 and gw_server[0]["parentId"] == caller_span
    by_id = {s["id"]: s for s in spans}
    assert all(s.get("parentId") in by_id for s in spans if s is not gw_server[0])
