"""`route validate`/`apply` warnings for rule hosts that name no service (Istio's analyzer:
IST0101 ReferencedResourceNotFound), and the short-name case spelled out: a short host is
the rule's namespace's service, never another namespace's of the same name."""

from meshctl.loader.resources import load_resources_text
from meshctl.model.base import FrozenDict
from meshctl.pilot.query import unknown_service_findings
from meshctl.registry.base import Instance


def inst(svc, ns=None):
    meta = {"meshctl.io/service-port": "9080"}
    if ns:
        meta["meshctl.io/namespace"] = ns
    return Instance(id=f"{svc}-v1-0", service=svc, address="127.0.0.1", port=21003,
                    labels=FrozenDict(app=svc, version="v1"), meta=FrozenDict(meta))


SHOP_ONLY = {"reviews": (inst("reviews", "shop"),), "ratings": (inst("ratings"),)}

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: {ns}}}
spec:
  hosts: [{host}]
  http:
  - route:
    - destination: {{host: {dest}}}
"""


def findings(text, snapshot=SHOP_ONLY):
    return [(f.level, f.source, f.message) for f in
            unknown_service_findings(load_resources_text(text, "vs.yaml"), (), snapshot)]


def test_a_short_host_of_another_namespaces_service_names_both():
    [(level, where, msg)] = findings(VS.format(ns="default", host="reviews", dest="reviews"))
    assert level == "warning" and where == "vs.yaml:5"
    assert "reviews names no known service" in msg
    assert "rule's namespace 'default' (reviews.default.svc.cluster.local)" in msg
    assert "the mesh has reviews.shop.svc.cluster.local" in msg
    assert "write reviews.shop (or its FQDN), or put the rule in namespace 'shop'" in msg


def test_a_destination_that_names_no_service_is_said_at_its_line():
    [(level, where, msg)] = findings(VS.format(ns="default", host="ratings", dest="reviews"))
    assert where == "vs.yaml:8" and "routes to no endpoint until reviews.default.svc.cluster.local registers" in msg
    assert "the mesh has reviews.shop.svc.cluster.local" in msg


def test_hosts_of_the_rules_namespace_or_named_in_full_say_nothing():
    assert findings(VS.format(ns="shop", host="reviews", dest="reviews")) == []
    assert findings(VS.format(ns="default", host="reviews.shop", dest="reviews.shop.svc.cluster.local")) == []
    assert findings(VS.format(ns="default", host="ratings", dest="ratings")) == []
    # an empty registry (no mesh has run): nothing to check against
    assert findings(VS.format(ns="default", host="nothing", dest="nothing"), {}) == []


def test_a_name_no_namespace_has_gets_no_hint():
    [(_, _, msg)] = findings(VS.format(ns="default", host="nothing", dest="nothing"))
    assert msg.startswith("nothing (nothing.default.svc.cluster.local) names no known service") and "mesh has" not in msg
