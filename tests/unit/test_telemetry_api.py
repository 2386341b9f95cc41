"""Istio's Telemetry API: Istio's own examples load and validate, the resources that reach
a workload merge in Istio's order, what meshctl does not carry out is refused by name,
the access-log filter's CEL subset, and metric overrides on the Prometheus text."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshctl.core.celfilter import CelError, evaluate, parse
from meshctl.loader.codec import LoadError
from meshctl.loader.resources import load_resources, load_resources_text
from meshctl.loader.validate import validate
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Workload
from meshctl.pilot.telemetry import telemetry_for
from meshctl.proxy.metric_overrides import apply_metric_overrides

DATA = Path(__file__).resolve().parent.parent / "data" / "istio-telemetry"


def wl(app: str, ns: str = "default", version: str = "v1") -> Workload:
    return Workload(name=f"{app}-{version}-0", service=app, namespace=ns, labels=FrozenDict(app=app, version=version))


def problems(text: str) -> list[str]:
    try:
        rs = load_resources_text(text, "t.yaml")
    except LoadError as e:
        return [str(e)]
    return [str(e) for e in validate(rs)]


def test_istios_examples_load_and_validate():
    rs = load_resources([DATA])
    assert {r.name for r in rs} == {"mesh-default", "foo-tracing", "mesh-logging-default", "disable-details-logging",
                                    "remove-tags", "remove-server"}
    assert validate(rs) == []


def test_hierarchy_mesh_then_namespace_then_workload():
    rs = load_resources([DATA / "mesh-default.yaml", DATA / "foo-tracing.yaml", DATA / "disable-details-logging.yaml"])
    pp = telemetry_for(rs, wl("productpage"))
    assert pp.sampling == 10.0 and pp.span_reporting and pp.access_log_server and pp.sources == ("istio-system/mesh-default",)
    details = telemetry_for(rs, wl("details"))  # a selector in the root namespace reaches every namespace
    assert not details.access_log_server and not details.access_log_client and details.sampling == 10.0
    foo = telemetry_for(rs, wl("foo", ns="bar"))  # service.istio.io/canonical-name is the app
    assert not foo.span_reporting and foo.sampling == 10.0
    assert telemetry_for(rs, wl("foo", ns="default")).span_reporting  # foo-tracing lives in namespace bar
    ns_level = load_resources_text(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: ns, namespace: default}\n"
        "spec:\n  tracing:\n  - randomSamplingPercentage: 50\n", "ns.yaml")
    assert telemetry_for(rs + ns_level, wl("productpage")).sampling == 50.0
    assert telemetry_for(rs + ns_level, wl("foo", ns="bar")).sampling == 10.0
    assert telemetry_for([], wl("productpage")).sampling is None  # mesh.yaml's rate applies


def test_access_log_mode_turns_off_one_direction():
    rs = load_resources_text(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: default}\n"
        "spec:\n  accessLogging:\n  - match: {mode: SERVER}\n    disabled: true\n", "t.yaml")
    tp = telemetry_for(rs, wl("details"))
    assert tp.access_log_client and not tp.access_log_server


@pytest.mark.parametrize("spec, field", [
    ("tracing:\n  - providers: [{name: zipkin}]", "providers"),
    ("tracing:\n  - customTags: {userId: {header: {name: userId, defaultValue: unknown}}}", "customTags"),
    ("accessLogging:\n  - providers: [{name: otel}]", "name otel"),
    ("metrics:\n  - providers: [{name: stackdriver}]", "name stackdriver"),
    ("metrics:\n  - overrides: [{match: {metric: REQUEST_COUNT}, tagOverrides: {request_host: {value: request.host}}}]",
     "value"),
    ("metrics:\n  - reportingInterval: 5s", "reportingInterval"),
    ("targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]", "targetRefs"),
])
def test_what_meshctl_does_not_carry_out_is_refused_by_name(spec, field):
    text = f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: t}}\nspec:\n  {spec}\n"
    msgs = problems(text)
    assert any("t.yaml:" in m and f"meshctl does not implement {field}" in m for m in msgs), msgs


def test_bad_values_name_their_field():
    bad = ("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t}\nspec:\n"
           "  tracing:\n  - randomSamplingPercentage: 150\n"
           "  accessLogging:\n  - filter: {expression: 'request.size > 10'}\n")
    msgs = problems(bad)
    assert any("randomSamplingPercentage" in m and "between 0 and 100" in m for m in msgs), msgs
    assert any("filter.expression" in m and "'request.size'" in m for m in msgs), msgs


def test_cel_subset():
    t = parse("response.code >= 400")
    assert evaluate(t, {"response.code": 503}) and not evaluate(t, {"response.code": 200})
    t = parse("request.url_path.startsWith('/api') && !(request.method == 'GET') || request.headers['x-debug'] == '1'")
    assert evaluate(t, {"request.url_path": "/api/v1", "request.method": "POST"})
    assert not evaluate(t, {"request.url_path": "/api/v1", "request.method": "GET", "request.headers": {}})
    assert evaluate(t, {"request.url_path": "/", "request.method": "GET", "request.headers": {"x-debug": "1"}})
    assert not evaluate(parse("response.code == 200"), {})  # a missing attribute: not logged
    for bad in ("", "response.code >=", "size(request.path) > 3", "request.path.matches('x')"):
        with pytest.raises(CelError):
            parse(bad)


TEXT = """# HELP istio_requests_total Requests.
# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",response_code="200",grpc_response_status="",x="a"} 3
istio_requests_total{reporter="destination",response_code="200",grpc_response_status="0",x="a"} 2
istio_requests_total{reporter="source",response_code="200",grpc_response_status="0",x="a"} 7
# HELP istio_request_bytes Request body size in bytes.
# TYPE istio_request_bytes histogram
istio_request_bytes_bucket{reporter="destination",le="1"} 1
istio_request_bytes_bucket{reporter="destination",le="+Inf"} 5
istio_request_bytes_sum{reporter="destination"} 9
istio_request_bytes_count{reporter="destination"} 5
"""


def test_metric_overrides_on_prometheus_text():
    rs = load_resources([DATA / "remove-tags.yaml"])
    out = apply_metric_overrides(TEXT, telemetry_for(rs, wl("details")).metric_overrides)
    lines = [ln for ln in out.splitlines() if ln.startswith("istio_requests_total{")]
    assert lines == ['istio_requests_total{reporter="destination",response_code="200",x="a"} 5',
                     'istio_requests_total{reporter="source",response_code="200",x="a"} 7']
    # Istio's remove-server: REQUEST_COUNT off on the server side (reporter="destination") only
    rs = load_resources([DATA / "remove-tags.yaml", DATA / "remove-server.yaml"])
    out = apply_metric_overrides(TEXT, telemetry_for(rs, wl("details")).metric_overrides)
    lines = [ln for ln in out.splitlines() if ln.startswith("istio_requests_total{")]
    assert lines == ['istio_requests_total{reporter="source",response_code="200",x="a"} 7']
    assert out.count("istio_request_bytes_") == 4  # another metric on the server side stays
    assert "# TYPE istio_requests_total counter" in out
    client_only = load_resources_text(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: istio-system}\nspec:\n"
        "  metrics:\n  - overrides:\n    - match: {metric: ALL_METRICS, mode: CLIENT}\n      disabled: true\n", "t.yaml")
    out = apply_metric_overrides(TEXT, telemetry_for(client_only, wl("details")).metric_overrides)
    assert 'reporter="source"' not in out and out.count('reporter="destination"') == 6
    assert apply_metric_overrides(TEXT, ()) == TEXT


def test_tracing_without_a_backend_is_refused_by_name():
    from meshctl.loader.tracing_backend import tracing_backend_findings

    rs = load_resources([DATA / "mesh-default.yaml", DATA / "foo-tracing.yaml"])
    found = tracing_backend_findings(rs, False, "the running mesh")
    assert [(f.level, f.source.rsplit("/", 1)[-1], f.field) for f in found] == [
        ("error", "mesh-default.yaml:9", "spec.tracing[0].randomSamplingPercentage")]  # foo-tracing: no spans asked
    assert "the running mesh has no tracing backend" in found[0].message and "settings.tracing" in found[0].message
    assert tracing_backend_findings(rs, True, "the running mesh") == []
    on = load_resources_text("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: a}\n"
                             "spec:\n  tracing:\n  - disableSpanReporting: false\n", "t.yaml")
    assert [f.field for f in tracing_backend_findings(on, False, "m")] == ["spec.tracing[0].disableSpanReporting"]
