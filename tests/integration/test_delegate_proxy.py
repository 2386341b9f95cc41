"""Delegate VirtualServices through a real gateway proxy, with Istio's own example
(the ``Delegate`` message of Istio's VirtualService reference, tests/data/istio-delegate,
unchanged but for lower-cased namespace names: see its README): the root VirtualService
on bookinfo.com hands /productpage to nsA's productpage VirtualService and /reviews to
nsB's reviews VirtualService; the delegates' routes apply under the root's matches."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import has_errors, validate
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import Inputs, Node, compile_proxy

from proxy_testkit import curl, free_port, running_proxy

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "istio-delegate"

# What the example leaves to the reader: the gateway, and the three services it names
# (ServiceEntries with this test's local servers as their endpoints).
GATEWAY = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["bookinfo.com"]
"""

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
spec:
  hosts: [{host}]
  ports:
  - {{number: 9080, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {port}}}
"""


def _example(*names: str) -> str:
    return "---\n".join((EXAMPLE / n).read_text() for n in names).replace("nsA", "nsa").replace("nsB", "nsb")


def _gateway_config(rules: str, ports: dict[str, int], listen: int):
    services = "---\n".join(SERVICE.format(name=n.split(".")[0], host=n, port=p) for n, p in ports.items())
    resources = load_resources_text(rules + "---\n" + GATEWAY + "---\n" + services, "delegate.yaml")
    findings = validate(resources)
    assert not has_errors(findings), [str(f) for f in findings]
    node = Node(Workload(name="gw", service="istio-ingressgateway", labels=FrozenDict(istio="ingressgateway")),
                (Listener(name="gateway-80", direction="gateway", address="127.0.0.1", port=listen, service_port=80),),
                gateway=True)
    return compile_proxy(Inputs(resources, {}), node)


async def _get(port: int, path: str) -> tuple[int, str]:
    r = await curl("-s", "-w", "\n%{http_code}", "-H", "Host: bookinfo.com", f"http://127.0.0.1:{port}{path}")
    body, _, code = r.stdout.decode().rpartition("\n")
    return int(code), (json.loads(body)["upstream"] if code == "200" else body)


async def test_istios_delegate_example_routes_by_the_delegates_rules_under_the_roots_matches(upstreams):
    pv1, pp, rv = upstreams("productpage-v1"), upstreams("productpage"), upstreams("reviews")
    lp = free_port()
    rules = _example("bookinfo-root.yaml", "productpage-delegate.yaml", "reviews-delegate.yaml")
    cfg = _gateway_config(rules, {"productpage-v1.nsa.svc.cluster.local": pv1.port,
                                  "productpage.nsa.svc.cluster.local": pp.port,
                                  "reviews.nsb.svc.cluster.local": rv.port}, lp)
    async with running_proxy(cfg):
        # nsA's delegate: /productpage/v1/ to productpage-v1, the rest of the root's /productpage to productpage
        assert await _get(lp, "/productpage/v1/index") == (200, "productpage-v1")
        assert await _get(lp, "/productpage") == (200, "productpage")
        assert await _get(lp, "/productpage/v2/index") == (200, "productpage")
        # nsB's delegate has no match: the root's /reviews applies
        assert await _get(lp, "/reviews/1") == (200, "reviews")
        # outside every root match: no route, whatever the delegates say
        code, _ = await _get(lp, "/details/1")
        assert code == 404
    assert [p for _, p, _ in pv1.requests] == ["/productpage/v1/index"]
    assert [p for _, p, _ in pp.requests] == ["/productpage", "/productpage/v2/index"]


async def test_a_delegate_route_outside_the_roots_match_does_not_apply_and_a_missing_delegate_routes_nothing(upstreams):
    pp, rv = upstreams("productpage"), upstreams("reviews")
    lp = free_port()
    # nsA's delegate routes /reviews too: outside the root's /productpage, so that route is dropped
    child = _example("productpage-delegate.yaml").replace(
        '  - route:\n    - destination:\n        host: productpage.nsa',
        '  - match:\n    - uri:\n        prefix: "/reviews"\n    route:\n    - destination:\n'
        '        host: reviews.nsb.svc.cluster.local\n  - route:\n    - destination:\n        host: productpage.nsa')
    assert "/reviews" in child
    rules = _example("bookinfo-root.yaml") + "---\n" + child  # nsB's reviews delegate is not applied
    findings = validate(load_resources_text(rules, "r.yaml"))
    assert any("spec.http[1].delegate: delegate VirtualService nsb/reviews not found" in str(f) for f in findings)
    cfg = _gateway_config(rules, {"productpage-v1.nsa.svc.cluster.local": pp.port,
                                  "productpage.nsa.svc.cluster.local": pp.port,
                                  "reviews.nsb.svc.cluster.local": rv.port}, lp)
    async with running_proxy(cfg):
        assert await _get(lp, "/productpage/x") == (200, "productpage")
        code, _ = await _get(lp, "/reviews/1")  # neither the missing delegate nor nsA's /reviews route
        assert code == 404
    assert rv.requests == []
