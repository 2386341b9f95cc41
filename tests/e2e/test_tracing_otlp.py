"""Tracing to an OpenTelemetry collector over OTLP/HTTP, end to end: Bookinfo under
`meshctl up` with ``settings.tracing.otlp`` pointing at the OpenTelemetry
Collector's own OTLP receiver (go.opentelemetry.io/collector/receiver/otlpreceiver,
built by scripts/tools/otlp-receiver.sh, which writes what it accepted as the
collector's OTLP JSON). One request through the ingress gateway is one trace,
every Bookinfo service is a resource with its ``service.name``, and each span is
the child of the span that called it."""

from __future__ import annotations

import json
import time
import urllib.error

import pytest

from .helpers import bookinfo_workdir
from .test_up_bookinfo import curl, meshctl

pytestmark = pytest.mark.e2e

SERVER, CLIENT = 2, 3  # OTLP Span.SpanKind


@pytest.fixture(scope="module")
def otlp_mesh(tmp_path_factory, otlp_receiver):
    work = tmp_path_factory.mktemp("bookinfo-otlp")
    gw_port = bookinfo_workdir(work)
    text = (work / "mesh.yaml").read_text()
    text = text.replace("settings:\n", f"settings:\n  tracing: {{otlp: '{otlp_receiver}', sampling: 100}}\n", 1)
    (work / "mesh.yaml").write_text(text)
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    try:
        meshctl("route", "apply", "--wait", "-f", "rules/bookinfo-gateway.yaml", "-f", "rules/destination-rule-all.yaml",
                "-f", "rules/virtual-service-reviews-v3.yaml", cwd=work)
        yield {"dir": work, "gw": f"http://127.0.0.1:{gw_port}", "out": otlp_receiver.out, "otlp": str(otlp_receiver)}
    finally:
        meshctl("down", cwd=work, check=False)


def received_spans(out) -> list[tuple[str, dict]]:
    """(service.name, span) for every span the collector accepted so far."""
    spans = []
    if not out.exists():
        return spans
    for line in out.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            attrs = {a["key"]: a["value"].get("stringValue") for a in rs["resource"].get("attributes", [])}
            for ss in rs["scopeSpans"]:
                assert ss["scope"]["name"] == "meshctl"
                for s in ss["spans"]:
                    spans.append((attrs["service.name"], s))
    return spans


def test_one_gateway_request_is_one_otlp_trace_across_bookinfo(otlp_mesh):
    gw = otlp_mesh["gw"]
    deadline = time.monotonic() + 30
    while curl(gw + "/productpage")[0] != 200:
        assert time.monotonic() < deadline, "productpage never answered 200 through the gateway"
        time.sleep(0.3)
    rid = "otlp-test-5e6f7a8b"
    code, page = curl(gw + "/productpage", "-H", f"x-request-id: {rid}")
    assert code == 200 and 'color="red"' in page

    def attrs(s):
        return {a["key"]: a["value"].get("stringValue") for a in s.get("attributes", [])}

    want = {"istio-ingressgateway.default", "productpage.default", "details.default", "reviews.default",
            "ratings.default"}
    spans: list = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # batches go out about every second
        spans = [(svc, s) for svc, s in received_spans(otlp_mesh["out"]) if attrs(s).get("guid:x-request-id") == rid]
        if len(spans) >= 9 and want <= {svc for svc, _ in spans}:
            break
        time.sleep(0.5)
    assert {svc for svc, _ in spans} == want, spans
    assert len(spans) == 9, [(svc, s["kind"]) for svc, s in spans]
    assert len({s["traceId"] for _, s in spans}) == 1 and len(spans[0][1]["traceId"]) == 32
    by_id = {s["spanId"]: (svc, s) for svc, s in spans}

    def kinds(service):
        return sorted(s["kind"] for svc, s in spans if svc == service)

    assert kinds("istio-ingressgateway.default") == [SERVER, CLIENT]
    assert kinds("productpage.default") == [SERVER, CLIENT, CLIENT]
    assert kinds("reviews.default") == [SERVER, CLIENT]
    assert kinds("details.default") == [SERVER] and kinds("ratings.default") == [SERVER]
    roots = [(svc, s) for svc, s in spans if not s.get("parentSpanId")]
    assert [(svc, s["kind"]) for svc, s in roots] == [("istio-ingressgateway.default", SERVER)]
    callers = {"productpage.default": "istio-ingressgateway.default", "details.default": "productpage.default",
               "reviews.default": "productpage.default", "ratings.default": "reviews.default"}
    for svc, s in spans:
        if not s.get("parentSpanId"):
            continue
        psvc, p = by_id[s["parentSpanId"]]  # KeyError: a dangling parent link
        if s["kind"] == SERVER:
            assert (psvc, p["kind"]) == (callers[svc], CLIENT), (svc, psvc)
        else:
            assert (psvc, p["kind"]) == (svc, SERVER), (svc, psvc)
        assert int(s["startTimeUnixNano"]) >= int(p["startTimeUnixNano"]) - 1_000_000
        assert int(s["endTimeUnixNano"]) > int(s["startTimeUnixNano"])
    # Envoy's tags as OTLP attributes
    ratings = next(s for svc, s in spans if svc == "ratings.default")
    a = attrs(ratings)
    assert a["http.status_code"] == "200" and a["node_id"] == "ratings-v1-0"
    assert a["destination.principal"] == "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    assert ratings["name"].startswith("ratings.default.svc.cluster.local:9080")
    rev_client = next(s for svc, s in spans if svc == "reviews.default" and s["kind"] == CLIENT)
    assert attrs(rev_client)["peer.service"].startswith("ratings")


def test_without_zipkin_the_dashboard_lists_recent_traces_itself(otlp_mesh):
    """Spans go to an OTLP collector, whose UI meshctl does not know: the dashboard links each
    service to Mixer's own list, gathered from the proxies' last sampled spans."""
    import urllib.request

    gw, work = otlp_mesh["gw"], otlp_mesh["dir"]
    rid = "otlp-dashboard-7c8d"
    assert curl(gw + "/productpage", "-H", f"x-request-id: {rid}")[0] == 200
    trace_id = None
    deadline = time.monotonic() + 20
    while trace_id is None:
        assert time.monotonic() < deadline, "the collector never got the request's spans"
        trace_id = next((s["traceId"] for _, s in received_spans(otlp_mesh["out"])
                         if any(a["key"] == "guid:x-request-id" and a["value"].get("stringValue") == rid
                                for a in s.get("attributes", []))), None)
        time.sleep(0.3)
    url = meshctl("dashboard", cwd=work).stdout.strip()
    base, token = url.split("/dashboard/?token=")

    def get(path):
        req = urllib.request.Request(base + path, headers={"cookie": f"meshctl_dashboard={token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    st = json.loads(get("/dashboard/state"))
    assert st["tracing"] == {"otlp": f"{otlp_mesh['otlp']}/v1/traces"}, st["tracing"]
    page = get("/dashboard/traces?service=ratings")
    assert f'id="trace-{trace_id}"' in page, page[:3000]
    chunk = page.split(f'id="trace-{trace_id}"', 1)[1].split("</details>", 1)[0]
    for svc in ("istio-ingressgateway.default", "productpage.default", "reviews.default", "ratings.default"):
        assert f'data-service="{svc}"' in chunk, (svc, chunk)
    assert "details.default" in get("/dashboard/traces?service=details")
    with pytest.raises(urllib.error.HTTPError) as e:  # the list needs the dashboard's cookie
        urllib.request.urlopen(base + "/dashboard/traces?service=ratings", timeout=5)
    assert e.value.code == 401


def test_proxy_admin_traces_needs_the_mesh_credential(otlp_mesh):
    """A proxy's admin /traces holds the URLs (query strings with tokens too) and request ids of
    sampled requests: any local user may connect to loopback, only the mesh's user gets them."""
    import urllib.request

    gw, work = otlp_mesh["gw"], otlp_mesh["dir"]
    rid = "admin-traces-3b9e"
    assert curl(gw + "/productpage?api_key=s3cr3t", "-H", f"x-request-id: {rid}")[0] == 200
    st = json.loads(meshctl("status", "--json", cwd=work).stdout)
    admin = "http://" + next(w for w in st["workloads"] if w["name"] == "productpage-v1-0")["admin_address"]
    for headers in ({}, {"authorization": "Bearer mesh.not-this-one"}, {"authorization": "Basic eDp5"}):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(admin + "/traces", headers=headers), timeout=5)
        assert e.value.code == 401 and e.value.headers["www-authenticate"] == "Bearer"
        assert "s3cr3t" not in e.value.read().decode()
    token = (work / ".meshctl" / "auth" / "mesh.token").read_text().strip()
    req = urllib.request.Request(admin + "/traces", headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        spans = json.loads(r.read())
    mine = [s for s in spans if s.get("tags", {}).get("guid:x-request-id") == rid]
    assert mine and any("api_key=s3cr3t" in s["tags"].get("http.url", "") for s in mine), spans[-3:]
