"""settings.namespace: a mesh's registry services live in its namespace
(``<svc>.<ns>.svc.cluster.local``), so rules written for that namespace, with short
names resolved in the rule's own namespace as Istio does, apply to them; rules naming
the default namespace's service do not."""

from meshctl.loader.resources import load_resources_text
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import Inputs, Node, compile_proxy, discover_services
from meshctl.registry.base import Instance


def inst(svc, version, port, ns=None):
    meta = {"meshctl.io/service-port": "9080", "meshctl.io/sidecar": "true"}
    if ns:
        meta["meshctl.io/namespace"] = ns
    return Instance(id=f"{svc}-{version}-0", service=svc, address="127.0.0.1", port=port,
                    labels=FrozenDict(app=svc, version=version), meta=FrozenDict(meta))


SHOP = {"reviews": (inst("reviews", "v1", 21003, "shop"), inst("reviews", "v2", 21004, "shop")),
        "productpage": (inst("productpage", "v1", 21001, "shop"),)}

NODE = Node(
    Workload(name="productpage-v1-0", service="productpage", namespace="shop", labels=FrozenDict(app="productpage")),
    (Listener(name="outbound", direction="outbound", address="127.0.0.1", port=15001),
     Listener(name="db", direction="binding", address="127.0.0.1", port=15002, protocol="tcp", service="reviews",
              service_port=9080)),
)

RULES = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: {ns}}}
spec:
  host: {dr_host}
  subsets:
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: {ns}}}
spec:
  hosts: [{vs_host}]
  http:
  - route:
    - destination: {{host: {vs_host}, subset: v2}}
"""


def reviews_route(ns, vs_host, dr_host="reviews"):
    resources = load_resources_text(RULES.format(ns=ns, vs_host=vs_host, dr_host=dr_host), "rules.yaml")
    cfg = compile_proxy(Inputs(resources, SHOP), NODE)
    vh = next(v for v in cfg.route_tables["outbound"].virtual_hosts if v.name == "reviews.shop.svc.cluster.local:9080")
    return [(rd.destination.host, rd.destination.subset) for rd in vh.routes[0].route], cfg


def test_registry_services_of_a_namespace_mesh_are_named_in_it():
    services = discover_services([], SHOP)
    assert sorted(services) == ["productpage.shop.svc.cluster.local", "reviews.shop.svc.cluster.local"]
    assert services["reviews.shop.svc.cluster.local"].namespace == "shop"
    # without meshctl.io/namespace: default, as before
    plain = {"reviews": (inst("reviews", "v1", 21003),)}
    assert list(discover_services([], plain)) == ["reviews.default.svc.cluster.local"]
    # one name in two namespaces: two services
    both = {"reviews": (inst("reviews", "v1", 21003), inst("reviews", "v2", 21004, "shop"))}
    got = discover_services([], both)
    assert sorted(got) == ["reviews.default.svc.cluster.local", "reviews.shop.svc.cluster.local"]
    assert [i.id for i in got["reviews.shop.svc.cluster.local"].instances] == ["reviews-v2-0"]


def test_short_and_fqdn_hosts_of_rules_in_the_namespace_route_to_its_service():
    for host in ("reviews", "reviews.shop", "reviews.shop.svc.cluster.local"):
        route, _ = reviews_route("shop", host)
        assert route == [("reviews.shop.svc.cluster.local", "v2")], host


def test_rules_naming_the_default_namespace_do_not_apply():
    route, _ = reviews_route("shop", "reviews.default.svc.cluster.local")
    assert route == [("reviews.shop.svc.cluster.local", None)]  # the default route: all instances
    route, _ = reviews_route("default", "reviews")  # a short name in a rule of namespace default
    assert route == [("reviews.shop.svc.cluster.local", None)]


def test_a_binding_names_the_service_of_its_proxys_namespace():
    _, cfg = reviews_route("shop", "reviews")
    db = next(lst for lst in cfg.listeners if lst.name == "db")
    assert db.service == "reviews.shop.svc.cluster.local"
    assert any(c.service == "reviews.shop.svc.cluster.local" and c.endpoints for c in cfg.clusters.values())


GROUPS = """\
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: reviews, namespace: {ns}}}
spec:
  metadata: {{labels: {{tier: back}}}}
  template: {{serviceAccount: bookinfo-reviews}}
"""


def test_a_workload_group_takes_the_instances_of_its_own_namespace():
    grouped = {"reviews": (Instance(id="reviews-vm-0", service="reviews", address="127.0.0.1", port=21003,
                                    labels=FrozenDict(app="reviews", **{"workload-group": "reviews"}),
                                    meta=FrozenDict({"meshctl.io/namespace": "shop"})),)}
    for ns, taken in (("shop", True), ("default", False)):
        services = discover_services(load_resources_text(GROUPS.format(ns=ns), "g.yaml"), grouped)
        i = services["reviews.shop.svc.cluster.local"].instances[0]
        assert (i.labels.get("tier") == "back") is taken, ns
        assert (i.meta.get("meshctl.io/service-account") == "bookinfo-reviews") is taken, ns


# ---------------------------------------------------------------- short names: the caller's namespace

# reviews in two namespaces, and a caller in each of them and in a third (Kubernetes DNS
# search path of a pod in X: reviews → reviews.X.svc.cluster.local; reviews.Y, reviews.Y.svc
# and the FQDN name Y's from anywhere)
TWO = {"reviews": (inst("reviews", "v1", 21003, "shop"), inst("reviews", "v2", 21004, "bookinfo")),
       "productpage": (inst("productpage", "v1", 21001, "shop"), inst("productpage", "v1", 21002, "bookinfo"))}


def outbound_router(ns, snapshot=TWO, rules=""):
    from meshctl.core.routebuild import build_router

    node = Node(Workload(name=f"productpage-v1-{ns}", service="productpage", namespace=ns,
                         labels=FrozenDict(app="productpage")),
                (Listener(name="outbound", direction="outbound", address="127.0.0.1", port=15001),))
    cfg = compile_proxy(Inputs(load_resources_text(rules, "r.yaml") if rules else [], snapshot), node)
    router = build_router(cfg.route_tables["outbound"], cfg.settings)
    assert router.warnings == []  # no domain is claimed by two services
    return router


def service_of(router, authority):
    vh = router.virtual_host(authority)
    return vh.name.rsplit(":", 1)[0] if vh else None


def test_a_short_name_is_the_service_of_the_callers_namespace():
    for ns in ("shop", "bookinfo"):
        r = outbound_router(ns)
        own = f"reviews.{ns}.svc.cluster.local"
        for a in ("reviews", "reviews:9080", f"reviews.{ns}", f"reviews.{ns}:9080", f"reviews.{ns}.svc",
                  f"reviews.{ns}.svc:9080", own, f"{own}:9080", "REVIEWS"):
            assert service_of(r, a) == own, (ns, a)


def test_another_namespaces_service_is_reached_by_name_dot_namespace_or_fqdn_only():
    r = outbound_router("shop")
    other = "reviews.bookinfo.svc.cluster.local"
    for a in ("reviews.bookinfo", "reviews.bookinfo:9080", "reviews.bookinfo.svc", "reviews.bookinfo.svc:9080",
              other, f"{other}:9080"):
        assert service_of(r, a) == other, a
    # a caller of a third namespace has no reviews of its own: the short name is no service
    r = outbound_router("default")
    assert service_of(r, "reviews") is None and service_of(r, "reviews:9080") is None
    assert service_of(r, "reviews.shop") == "reviews.shop.svc.cluster.local"


def test_default_namespace_callers_keep_short_names_of_default_services():
    plain = {"reviews": (inst("reviews", "v1", 21003),), "ratings": (inst("ratings", "v1", 21005),)}
    r = outbound_router("default", plain)
    assert service_of(r, "reviews:9080") == "reviews.default.svc.cluster.local"
    assert service_of(r, "ratings") == "ratings.default.svc.cluster.local"


def test_a_rule_routes_the_service_of_its_own_namespace_for_callers_of_every_namespace():
    # a VirtualService of namespace bookinfo with the short host reviews: reviews.bookinfo (Istio's
    # rule-namespace resolution), whoever calls it; shop's reviews keeps its default route
    rules = RULES.format(ns="bookinfo", vs_host="reviews", dr_host="reviews")
    for caller in ("shop", "bookinfo"):
        r = outbound_router(caller, rules=rules)
        vb = r.virtual_host("reviews.bookinfo:9080")
        assert [(d.destination.host, d.destination.subset) for d in vb.routes[0].route] == \
            [("reviews.bookinfo.svc.cluster.local", "v2")], caller
        vs = r.virtual_host("reviews.shop:9080")
        assert [(d.destination.host, d.destination.subset) for d in vs.routes[0].route] == \
            [("reviews.shop.svc.cluster.local", None)], caller


def test_a_short_name_of_another_namespace_only_is_answered_with_where_it_is():
    # a caller of namespace default asks for `reviews`, which only shop and bookinfo have:
    # the reply (and route explain) names them, so a user of the looser resolution knows why
    from meshctl.core.route import NoRoute, RequestView
    from meshctl.core.routeexplain import explain
    import random

    r = outbound_router("default")
    assert r.elsewhere("reviews:9080") == ["reviews.bookinfo", "reviews.shop"]
    assert r.elsewhere("reviews.shop:9080") == [] and r.elsewhere("nothing") == []
    d = r.decide(RequestView(method="GET", scheme="http", path="/", authority="reviews:9080", headers=()), random.Random(0))
    assert isinstance(d, NoRoute) and d.reason.endswith(
        "(a short name is a service of the caller's own namespace; other namespaces have reviews.bookinfo, reviews.shop)")
    assert "other namespaces have reviews.bookinfo, reviews.shop" in explain(r,
        RequestView(method="GET", scheme="http", path="/", authority="reviews", headers=()))[-1]
