"""loader.validate: istioctl-analyze-like checks, each naming file:line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshctl.loader.resources import load_resources, load_resources_text
from meshctl.loader.validate import Finding, has_errors, regex_problem, validate
from meshctl.model.istio import DestinationRule, HTTPRoute, HTTPRouteDestination, Resource, VirtualService, Destination

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLES = sorted((DATA / "istio").glob("*.yaml"))


def head(kind: str, name: str = "r", group: str = "networking.istio.io") -> str:
    return f"apiVersion: {group}/v1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n"  # spec body starts on line 6


VS = head("VirtualService")
DR = head("DestinationRule")


def findings(text: str) -> list[str]:
    return [str(f) for f in validate(load_resources_text(text, file="t.yaml"))]


# ---------------------------------------------------------------- Istio's samples


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_validates_cleanly_with_its_destination_rules(path):
    resources = load_resources([path])
    if not any(isinstance(r.spec, DestinationRule) for r in resources):
        resources += load_resources([DATA / "istio" / "destination-rule-all.yaml"])
    assert validate(resources) == []


def test_all_samples_together_have_no_errors():
    result = validate(load_resources([DATA / "istio"]))
    assert not has_errors(result)
    # alternatives to each other: later files replace earlier ones, and we say so
    assert result and all(f.level == "warning" and " is defined " in f.message for f in result)
    # ... once per resource, at the definition that wins (the last), naming the others
    names = [f.message.split(" is defined ")[0] for f in result]
    assert len(names) == len(set(names))


def test_subset_reference_without_destination_rule_is_a_warning():
    (f,) = validate(load_resources([DATA / "istio" / "virtual-service-reviews-v3.yaml"]))
    assert f == Finding(
        "warning",
        f"{DATA / 'istio' / 'virtual-service-reviews-v3.yaml'}:12",
        "spec.http[0].route[0].destination.subset",
        "referenced subset not found: no DestinationRule for host 'reviews' defines subset 'v3'",
    )


def test_applied_rules_count_for_references_but_only_new_ones_are_reported():
    applied = load_resources([DATA / "istio" / "destination-rule-all.yaml", DATA / "istio" / "bookinfo-gateway.yaml"])
    new = load_resources([DATA / "istio" / "virtual-service-reviews-v3.yaml"])
    assert validate(new, context=applied) == []
    # the applied ones conflict with each other (two DRs for one host): not this apply's business
    twice = applied + load_resources_text(DR + "  host: reviews\n", file="applied.yaml")
    assert validate(new, context=twice) == []


# ---------------------------------------------------------------- one table of bad rules

CASES = [
    (
        "string match with two kinds",
        VS + "  hosts: [reviews]\n  http:\n  - match:\n    - uri:\n        exact: /a\n        prefix: /b\n"
        "    route:\n    - destination: {host: reviews}\n",
        ["t.yaml:9: error: spec.http[0].match[0].uri: only one of exact, prefix or regex may be set, got exact and prefix"],
    ),
    (
        "string match with none",
        VS + "  hosts: [reviews]\n  http:\n  - match:\n    - uri: {}\n    route:\n    - destination: {host: reviews}\n",
        ["t.yaml:9: error: spec.http[0].match[0].uri: one of exact, prefix or regex is required"],
    ),
    (
        "header presence match is fine, regex that does not compile is not",
        VS + "  hosts: [reviews]\n  http:\n  - match:\n    - headers:\n        x-canary: {}\n"
        "        end-user:\n          regex: '(['\n    route:\n    - destination: {host: reviews}\n",
        ["t.yaml:12: error: spec.http[0].match[0].headers.end-user.regex: invalid regex '([': RE2 (Istio's and Envoy's engine) refuses it: missing ]: ["],
    ),
    (
        "regex RE2 cannot run",
        VS + "  hosts: [reviews]\n  http:\n  - match:\n    - uri:\n        regex: '/api(?!/internal).*'\n"
        "    route:\n    - destination: {host: reviews}\n",
        ["t.yaml:10: error: spec.http[0].match[0].uri.regex: invalid regex '/api(?!/internal).*': RE2 (Istio's and Envoy's engine) refuses it: invalid perl operator: (?!"],
    ),
    (
        "weight on some destinations only",
        VS + "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: 100\n"
        "    - destination: {host: ratings}\n",
        ["t.yaml:11: error: spec.http[0].route[1]: weight missing: 1 of 2 destinations have a weight; set it on all of them or on none"],
    ),
    (
        "weights not summing to 100",
        VS + "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: 50\n"
        "    - destination: {host: ratings}\n      weight: 40\n",
        ["t.yaml:8: error: spec.http[0].route: weights sum to 90, not 100"],
    ),
    (
        "negative weight",
        VS + "  hosts: [reviews]\n  tcp:\n  - route:\n    - destination: {host: reviews}\n      weight: -10\n"
        "    - destination: {host: ratings}\n      weight: 110\n",
        ["t.yaml:10: error: spec.tcp[0].route[0].weight: negative weight -10"],
    ),
    (
        "route without any action",
        VS + "  hosts: [reviews]\n  http:\n  - match:\n    - uri: {prefix: /}\n",
        ["t.yaml:8: error: spec.http[0]: an HTTP route needs one of route, redirect or directResponse"],
    ),
    (
        "redirect together with route",
        VS + "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n"
        "    redirect:\n      uri: /v2\n      derivePort: FROM_REQEST_PORT\n",
        [
            "t.yaml:10: error: spec.http[0].redirect: route and redirect cannot be set together on one HTTP route",
            "t.yaml:12: error: spec.http[0].redirect.derivePort: unknown value 'FROM_REQEST_PORT' (did you mean FROM_REQUEST_PORT?)",
        ],
    ),
    (
        "subset no DestinationRule defines",
        VS + "  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v4\n"
        "---\n" + head("DestinationRule", "reviews") + "  host: reviews.default.svc.cluster.local\n"
        "  subsets:\n  - name: v1\n    labels: {version: v1}\n",
        ["t.yaml:11: error: spec.http[0].route[0].destination.subset: referenced subset not found: DestinationRule default/reviews for host 'reviews' defines v1, not 'v4'"],
    ),
    (
        "duplicate subset names",
        DR + "  host: reviews\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v1\n    labels: {version: v2}\n",
        ["t.yaml:10: error: spec.subsets[1].name: duplicate subset name 'v1' (also spec.subsets[0])"],
    ),
    (
        "two VirtualServices for one host",
        VS + "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n"
        "---\n" + head("VirtualService", "reviews-canary") + "  hosts: [reviews.default.svc.cluster.local]\n"
        "  http:\n  - route:\n    - destination: {host: reviews}\n",
        ["t.yaml:16: warning: spec.hosts[0]: conflicting VirtualServices for host 'reviews.default.svc.cluster.local': also defined by VirtualService default/r (t.yaml:1)"],
    ),
    (
        "two VirtualServices for one host on a Gateway merge, as in Istio: no warning",
        VS + "  hosts: ['*']\n  gateways: [gw]\n  http:\n  - route:\n    - destination: {host: reviews}\n"
        "---\n" + head("VirtualService", "acme") + "  hosts: ['*']\n  gateways: [gw]\n"
        "  http:\n  - match: [{uri: {prefix: /.well-known/}}]\n    route:\n    - destination: {host: ratings}\n"
        "---\n" + head("Gateway", "gw") + "  selector: {istio: ingressgateway}\n"
        "  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n",
        [],
    ),
    (
        "two DestinationRules for one host",
        DR + "  host: reviews\n---\n" + head("DestinationRule", "reviews-2") + "  host: reviews\n",
        ["t.yaml:13: warning: spec.host: conflicting DestinationRules for host 'reviews': also defined by DestinationRule default/r (t.yaml:1)"],
    ),
    (
        "negative retry attempts",
        VS + "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n    retries:\n      attempts: -1\n",
        ["t.yaml:11: error: spec.http[0].retries.attempts: attempts must not be negative, got -1"],
    ),
    (
        "abort status and percentage out of range",
        VS + "  hosts: [ratings]\n  http:\n  - fault:\n      abort:\n        httpStatus: 600\n        percentage:\n"
        "          value: 120\n    route:\n    - destination: {host: ratings}\n",
        [
            "t.yaml:10: error: spec.http[0].fault.abort.httpStatus: HTTP status 600 is outside 200-599",
            "t.yaml:12: error: spec.http[0].fault.abort.percentage.value: percentage 120 is outside 0-100",
        ],
    ),
    (
        "fault without delay or abort, a delay under 1ms, an abort with both statuses",
        VS + "  hosts: [ratings]\n  http:\n  - fault: {}\n    route:\n    - destination: {host: ratings}\n"
        "  - fault:\n      delay: {fixedDelay: 0.5ms}\n      abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}\n"
        "    route:\n    - destination: {host: ratings}\n",
        [
            "t.yaml:8: error: spec.http[0].fault: a fault needs a delay or an abort",
            "t.yaml:12: error: spec.http[1].fault.delay.fixedDelay: a delay must be at least 1ms, got 0.0005s",
            "t.yaml:13: error: spec.http[1].fault.abort: only one of httpStatus and grpcStatus may be set",
        ],
    ),
    (
        "load balancer both ways, and a misspelt algorithm",
        DR + "  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBBIN\n"
        "      consistentHash: {httpHeaderName: x-user}\n    tls:\n      mode: ISTIO_MUTAL\n"
        "    connectionPool:\n      http: {h2UpgradePolicy: ALWAYS}\n",
        [
            "t.yaml:9: error: spec.trafficPolicy.loadBalancer.simple: unknown value 'ROUND_ROBBIN' (did you mean ROUND_ROBIN?)",
            "t.yaml:8: error: spec.trafficPolicy.loadBalancer: simple and consistentHash cannot both be set",
            "t.yaml:12: error: spec.trafficPolicy.tls.mode: unknown value 'ISTIO_MUTAL' (did you mean ISTIO_MUTUAL?)",
            "t.yaml:14: error: spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: unknown value 'ALWAYS' (expected one of: DEFAULT, DO_NOT_UPGRADE, UPGRADE)",
        ],
    ),
    (
        "ServiceEntry port, location and resolution",
        head("ServiceEntry") + "  hosts: [api.example.com]\n  ports:\n  - number: 70000\n    name: https\n    protocol: HTTPS\n"
        "  location: MESH_EXTERNEL\n  resolution: DYNAMIC\n",
        [
            "t.yaml:8: error: spec.ports[0].number: port 70000 is outside 1-65535",
            "t.yaml:11: error: spec.location: unknown value 'MESH_EXTERNEL' (did you mean MESH_EXTERNAL?)",
            "t.yaml:12: error: spec.resolution: unknown value 'DYNAMIC' (expected one of: NONE, STATIC, DNS, DNS_ROUND_ROBIN)",
        ],
    ),
    (
        "empty hosts",
        VS + "  hosts: []\n  http:\n  - route:\n    - destination: {host: reviews}\n",
        ["t.yaml:6: error: spec.hosts: at least one host is required (a VirtualService without hosts is a "
         "delegate, and no root VirtualService delegates to default/r: apply them together)"],
    ),
    (
        "Gateway with no servers, VirtualService naming a missing gateway",
        head("Gateway", "gw") + "  selector: {istio: ingressgateway}\n---\n"
        + VS + "  hosts: ['*']\n  gateways: [bookinfo-gateway]\n  http:\n  - route:\n    - destination: {host: productpage}\n",
        [
            "t.yaml:5: error: spec.servers: a Gateway needs at least one server",
            "t.yaml:14: warning: spec.gateways[0]: referenced gateway not found: 'bookinfo-gateway'",
        ],
    ),
    (
        "PeerAuthentication mode",
        head("PeerAuthentication", group="security.istio.io") + "  mtls:\n    mode: STRIKT\n",
        ["t.yaml:7: error: spec.mtls.mode: unknown value 'STRIKT' (did you mean STRICT?)"],
    ),
    (
        "AuthorizationPolicy action and ports",
        head("AuthorizationPolicy", group="security.istio.io") + "  action: REJECT\n  rules:\n  - to:\n"
        "    - operation:\n        ports: ['8080', http]\n",
        [
            "t.yaml:6: error: spec.action: unknown value 'REJECT' (expected one of: ALLOW, DENY, AUDIT, CUSTOM)",
            "t.yaml:10: error: spec.rules[0].to[0].operation.ports[1]: port 'http' is not a number",
        ],
    ),
    (
        "server TLS mode and HTTPS without tls",
        head("Gateway", "gw") + "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: ['*']\n"
        "  - port: {number: 8443, name: tls, protocol: TLS}\n    hosts: ['*']\n    tls: {mode: PASSTHRU}\n",
        [
            "t.yaml:7: error: spec.servers[0].tls: a HTTPS server needs tls settings",
            "t.yaml:11: error: spec.servers[1].tls.mode: unknown value 'PASSTHRU' (did you mean PASSTHROUGH?)",
        ],
    ),
]


@pytest.mark.parametrize("name, text, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_rule(name, text, expected):
    assert findings(text) == expected


def test_invalid_file_reports_every_problem_with_its_line():
    path = DATA / "bad" / "invalid-reviews.yaml"
    result = validate(load_resources([path]))
    assert [(f.level, f.source.rsplit(":", 1)[1], f.field) for f in result] == [
        ("error", "13", "spec.http[0].match[1].uri"),
        ("error", "14", "spec.http[0].route"),
        ("error", "20", "spec.http[0].route[1].destination.subset"),
        ("error", "26", "spec.http[0].fault.abort.httpStatus"),
        ("error", "37", "spec.subsets[1].name"),
    ]
    assert has_errors(result)


def test_resources_built_in_code_still_validate():
    # no file behind them: findings fall back to kind/namespace/name
    vs = VirtualService(
        hosts=("reviews",),
        http=(HTTPRoute(route=(HTTPRouteDestination(Destination("reviews"), weight=30),)),),
    )
    (f,) = validate([Resource("networking.istio.io/v1", "VirtualService", "reviews", "default", vs)])
    assert str(f) == "VirtualService/default/reviews: error: spec.http[0].route: weights sum to 30, not 100"


@pytest.mark.parametrize(
    "pattern, ok",
    [("^/api/v[0-9]+/.*", True), ("[(?=]x", True), (r"\\1", True), (r"(a)\1", False), ("(?<=a)b", False), ("(", False)],
)
def test_regex_problem(pattern, ok):
    assert (regex_problem(pattern) is None) == ok


def test_client_tls_settings_meshctl_does_not_carry_out_are_refused_by_name():
    # Sidecars send no SNI under ISTIO_MUTUAL: it would be accepted and ignored, so it
    # is refused where it is written.
    text = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      sni: reviews.example
      subjectAltNames: [spiffe://cluster.local/ns/default/sa/reviews]
"""
    got = findings(text)
    assert any(f.startswith("t.yaml:9: error: spec.trafficPolicy.tls.sni: meshctl does not implement sni with ISTIO_MUTUAL")
               for f in got), got
    # a SAN list is checked now (tests/integration/test_subject_alt_names.py): accepted
    assert not any("subjectAltNames" in f for f in got), got
    simple = text.replace("ISTIO_MUTUAL", "SIMPLE").replace("      subjectAltNames: [spiffe://cluster.local/ns/default/sa/reviews]\n", "")
    assert findings(simple) == []  # SIMPLE sends the sni and checks the name
