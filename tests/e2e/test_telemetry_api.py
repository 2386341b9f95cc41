"""Istio's Telemetry API applied live with `meshctl route apply` to Bookinfo under
`meshctl up`: access logging off for one workload (Istio's own
disable-details-logging example, unchanged) and filtered by a CEL expression,
metric overrides (Istio's remove-tags and remove-server examples) on what
Prometheus scrapes, and trace sampling and span reporting per workload, with the
spans read back from the OpenTelemetry Collector's OTLP receiver."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from .helpers import bookinfo_workdir
from .test_up_bookinfo import curl, meshctl

pytestmark = pytest.mark.e2e

DATA = Path(__file__).resolve().parent.parent / "data" / "istio-telemetry"

SAMPLE_ALL = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: mesh-default
  namespace: istio-system
spec:
  tracing:
  - randomSamplingPercentage: 100
"""

QUIET_PRODUCTPAGE = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: productpage-quiet
  namespace: default
spec:
  selector:
    matchLabels:
      service.istio.io/canonical-name: productpage
  tracing:
  - disableSpanReporting: true
  accessLogging:
  - providers:
    - name: envoy
    filter:
      expression: response.code >= 400
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, otlp_receiver):
    work = tmp_path_factory.mktemp("bookinfo-telemetry")
    gw_port = bookinfo_workdir(work)
    text = (work / "mesh.yaml").read_text()
    # no sampling from mesh.yaml: only a Telemetry resource can turn tracing on here
    text = text.replace("settings:\n", f"settings:\n  tracing: {{otlp: '{otlp_receiver}', sampling: 0}}\n", 1)
    (work / "mesh.yaml").write_text(text)
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    try:
        meshctl("route", "apply", "--wait", "-f", "rules/bookinfo-gateway.yaml", "-f", "rules/destination-rule-all.yaml",
                "-f", "rules/virtual-service-reviews-v3.yaml", cwd=work)
        gw = f"http://127.0.0.1:{gw_port}"
        deadline = time.monotonic() + 30
        while curl(gw + "/productpage")[0] != 200:
            assert time.monotonic() < deadline, "productpage never answered 200 through the gateway"
            time.sleep(0.3)
        yield {"dir": work, "gw": gw, "otlp": otlp_receiver.out}
    finally:
        meshctl("down", cwd=work, check=False)


def access_lines(work: Path, instance: str) -> list[dict]:
    f = work / ".meshctl" / "logs" / f"{instance}.access.log"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def admin(work: Path, instance: str) -> str:
    st = json.loads(meshctl("status", "--json", cwd=work).stdout)
    w = next(w for w in st["workloads"] if w["name"] == instance)
    return "http://" + w["admin_address"]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def spans_for(out: Path, rid: str) -> list[str]:
    """service.name of every span the collector got for request id ``rid``."""
    found = []
    if out.exists():
        for line in out.read_text().splitlines():
            for rs in json.loads(line)["resourceSpans"]:
                svc = rs["resource"]["attributes"][0]["value"]["stringValue"]
                for ss in rs["scopeSpans"]:
                    for s in ss["spans"]:
                        if any(a["key"] == "guid:x-request-id" and a["value"]["stringValue"] == rid
                               for a in s.get("attributes", [])):
                            found.append(svc)
    return found


def settle(pred, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_access_logging_off_for_details_and_filtered_for_productpage(mesh):
    work, gw = mesh["dir"], mesh["gw"]
    assert curl(gw + "/productpage", "-H", "x-request-id: before-telemetry")[0] == 200
    settle(lambda: any(r["x_request_id"] == "before-telemetry" for r in access_lines(work, "details-v1-0")),
           "details logged nothing before any Telemetry")
    meshctl("route", "apply", "--wait", "-f", str(DATA / "disable-details-logging.yaml"), cwd=work)
    assert curl(gw + "/productpage", "-H", "x-request-id: details-off")[0] == 200
    settle(lambda: any(r["x_request_id"] == "details-off" for r in access_lines(work, "productpage-v1-0")),
           "productpage stopped logging too")
    time.sleep(1.5)  # a flush interval: details would have written its line by now
    assert not any(r["x_request_id"] == "details-off" for r in access_lines(work, "details-v1-0"))

    (work / "quiet.yaml").write_text(QUIET_PRODUCTPAGE)
    meshctl("route", "apply", "--wait", "-f", "quiet.yaml", cwd=work)
    assert curl(gw + "/productpage", "-H", "x-request-id: ok-200")[0] == 200
    # routed to productpage by the Bookinfo gateway (prefix /static), and not there: productpage answers 404
    assert curl(gw + "/static/no-such-file.css", "-H", "x-request-id: miss-404")[0] == 404
    settle(lambda: any(r["x_request_id"] == "miss-404" for r in access_lines(work, "productpage-v1-0")),
           "the 404 was not logged by productpage")
    time.sleep(1.5)
    pp = access_lines(work, "productpage-v1-0")
    assert not any(r["x_request_id"] == "ok-200" for r in pp), "a 200 passed the filter response.code >= 400"
    # the filter is productpage's alone: reviews logs the 200 it served (waited for its flush, bounded)
    settle(lambda: "ok-200" in {r["x_request_id"] for r in access_lines(work, "reviews-v3-0")},
           "reviews did not log the 200 it served")
    meshctl("route", "delete", "-f", "quiet.yaml", cwd=work)


def test_metric_overrides_shape_what_prometheus_scrapes(mesh):
    work, gw = mesh["dir"], mesh["gw"]
    for _ in range(3):
        assert curl(gw + "/productpage")[0] == 200
    base = admin(work, "productpage-v1-0")  # a server (for the gateway) and a client (of details, reviews)
    before = get(base + "/metrics")
    assert 'istio_requests_total{reporter="destination"' in before and "grpc_response_status=" in before
    meshctl("route", "apply", "--wait", "-f", str(DATA / "remove-tags.yaml"), "-f", str(DATA / "remove-server.yaml"),
            cwd=work)
    after = get(base + "/metrics")
    requests = [line for line in after.splitlines() if line.startswith("istio_requests_total{")]
    # remove-server: the server side's request count is gone, the client side's stays
    assert requests and all(line.startswith('istio_requests_total{reporter="source"') for line in requests)
    # remove-tags: what stays lost grpc_response_status
    assert all("grpc_response_status" not in line for line in requests)
    durations = [line for line in after.splitlines() if line.startswith("istio_request_duration_milliseconds_bucket{")]
    assert any('reporter="destination"' in line for line in durations)  # REQUEST_COUNT only
    assert durations and all("grpc_response_status=" in line for line in durations)
    # the counts are kept: the series without the tag sum what the ones with it counted
    total = sum(float(line.rsplit(" ", 1)[1]) for line in requests)
    assert total >= sum(float(line.rsplit(" ", 1)[1]) for line in before.splitlines()
                        if line.startswith('istio_requests_total{reporter="source"')) > 0
    # Mixer's /stats (meshctl top, the dashboard) stays whole
    assert 'istio_requests_total{reporter="destination"' in get(base + "/stats")


def test_sampling_and_span_reporting_per_workload(mesh):
    work, gw, out = mesh["dir"], mesh["gw"], mesh["otlp"]
    assert curl(gw + "/productpage", "-H", "x-request-id: unsampled-1")[0] == 200
    time.sleep(2.0)
    assert spans_for(out, "unsampled-1") == []  # settings.tracing.sampling: 0
    (work / "sample-all.yaml").write_text(SAMPLE_ALL)
    meshctl("route", "apply", "--wait", "-f", "sample-all.yaml", cwd=work)
    assert curl(gw + "/productpage", "-H", "x-request-id: sampled-1")[0] == 200
    want = {"istio-ingressgateway.default", "productpage.default", "details.default", "reviews.default",
            "ratings.default"}
    settle(lambda: set(spans_for(out, "sampled-1")) == want, "a 100 % Telemetry did not trace the request")
    (work / "quiet.yaml").write_text(QUIET_PRODUCTPAGE)
    meshctl("route", "apply", "--wait", "-f", "quiet.yaml", cwd=work)
    assert curl(gw + "/productpage", "-H", "x-request-id: sampled-2")[0] == 200
    settle(lambda: set(spans_for(out, "sampled-2")) == want - {"productpage.default"},
           f"disableSpanReporting on productpage: {spans_for(out, 'sampled-2')}")
    time.sleep(1.5)
    assert "productpage.default" not in spans_for(out, "sampled-2")
