"""Pilot's compiler: Istio's Bookinfo rules + registry endpoints → ProxyConfig."""

from pathlib import Path

import pytest

from meshctl.loader.codec import from_data, to_data
from meshctl.loader.resources import load_resources, load_resources_text
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, ProxyConfig, Workload, cluster_name
from meshctl.pilot.compile import Inputs, Node, compile_proxy, mtls_mode_for
from meshctl.registry.base import Instance

RULES = Path(__file__).parents[2] / "examples" / "bookinfo" / "rules"
FQ = "{}.default.svc.cluster.local"


def inst(svc, version, port):
    return Instance(
        id=f"{svc}-{version}-0", service=svc, address="127.0.0.1", port=port,
        labels=FrozenDict(app=svc, version=version),
        meta=FrozenDict({"meshctl.io/service-port": "9080", "meshctl.io/sidecar": "true"}),
    )


SNAP = {
    "productpage": (inst("productpage", "v1", 21001),),
    "details": (inst("details", "v1", 21002),),
    "reviews": (inst("reviews", "v1", 21003), inst("reviews", "v2", 21004), inst("reviews", "v3", 21005)),
    "ratings": (inst("ratings", "v1", 21006),),
}

PRODUCTPAGE = Node(
    Workload(name="productpage-v1-0", service="productpage", labels=FrozenDict(app="productpage", version="v1")),
    (
        Listener(name="outbound", direction="outbound", address="127.0.0.1", port=15001),
        Listener(name="inbound", direction="inbound", address="127.0.0.1", port=15006, app_address="127.0.0.1", app_port=9080),
    ),
)
GATEWAY = Node(
    Workload(name="gw", service="istio-ingressgateway", labels=FrozenDict(istio="ingressgateway")),
    (Listener(name="gateway-80", direction="gateway", address="127.0.0.1", port=8080, service_port=80),),
    gateway=True,
)


def compile_with(*files, snap=SNAP, node=PRODUCTPAGE) -> ProxyConfig:
    resources = load_resources([RULES / f for f in files]) if files else []
    return compile_proxy(Inputs(resources, snap), node)


def vhost(cfg, service):
    return next(v for v in cfg.route_tables["outbound"].virtual_hosts if v.name == f"{FQ.format(service)}:9080")


def test_service_without_virtual_service_gets_a_default_route_to_all_instances():
    cfg = compile_with()
    vh = vhost(cfg, "reviews")
    assert [rd.destination.host for rd in vh.routes[0].route] == [FQ.format("reviews")]
    assert len(cfg.clusters[cluster_name(FQ.format("reviews"), 9080)].endpoints) == 3


def test_short_name_namespace_and_fqdn_all_reach_the_virtual_host():
    vh = vhost(compile_with(), "reviews")
    for d in ("reviews:9080", "reviews", "reviews.default:9080", FQ.format("reviews") + ":9080"):
        assert d in vh.domains


def test_subsets_become_clusters_with_only_the_matching_instances():
    cfg = compile_with("destination-rule-all.yaml")
    v2 = cfg.clusters[cluster_name(FQ.format("reviews"), 9080, "v2")]
    assert [e.instance for e in v2.endpoints] == ["reviews-v2-0"]
    assert v2.endpoints[0].identity == "spiffe://cluster.local/ns/default/sa/reviews"


def test_an_endpoint_registered_with_a_service_account_is_expected_to_present_it():
    named = Instance(id="ratings-v1-0", service="ratings", address="127.0.0.1", port=21006,
                     labels=FrozenDict(app="ratings", version="v1"),
                     meta=FrozenDict({"meshctl.io/service-port": "9080", "meshctl.io/sidecar": "true",
                                      "meshctl.io/service-account": "bookinfo-ratings"}))
    cfg = compile_with(snap={**SNAP, "ratings": (named,)})
    ep = cfg.clusters[cluster_name(FQ.format("ratings"), 9080)].endpoints[0]
    assert ep.identity == "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"


def test_reviews_test_v2_routes_jason_to_v2_and_everyone_else_to_v1():
    cfg = compile_with("destination-rule-all.yaml", "virtual-service-reviews-test-v2.yaml")
    routes = vhost(cfg, "reviews").routes
    assert routes[0].match[0].headers["end-user"].exact == "jason"
    assert routes[0].route[0].destination.subset == "v2"
    assert routes[1].route[0].destination.subset == "v1"
    # Destinations are fully qualified and carry the service port, so the proxy can name the cluster.
    assert routes[0].route[0].destination.host == FQ.format("reviews")
    assert routes[0].route[0].destination.port.number == 9080


def test_route_to_an_undefined_subset_gets_an_empty_cluster_not_a_crash():
    cfg = compile_with("virtual-service-all-v1.yaml")  # subsets, but no DestinationRule
    c = cfg.clusters[cluster_name(FQ.format("reviews"), 9080, "v1")]
    assert c.endpoints == ()


def test_gateway_gets_the_virtual_services_bound_to_its_gateway():
    cfg = compile_with("bookinfo-gateway.yaml", node=GATEWAY)
    table = cfg.route_tables["gateway-80"]
    assert [vh.domains for vh in table.virtual_hosts] == [("*",)]
    assert table.virtual_hosts[0].routes[0].route[0].destination.host == FQ.format("productpage")
    assert cfg.listeners[0].route_table == "gateway-80"


def test_two_gateways_on_one_port_with_the_same_host_merge_their_virtual_services():
    # Istio's samples/bookinfo/networking/certmanager-gateway.yaml (tests/data/istio-more), unchanged,
    # beside Bookinfo's: both Gateways serve port 80 for "*"; as in Istio, the gateway merges the
    # VirtualServices of one host, so the ACME path reaches cert-manager and /productpage still
    # reaches productpage (before, the first virtual host took "*" and the other was ignored).
    import random

    from meshctl.core.route import Forward, RequestView
    from meshctl.core.routebuild import build_router

    more = Path(__file__).parents[1] / "data" / "istio-more"
    resources = load_resources([RULES / "bookinfo-gateway.yaml", more / "certmanager-gateway.yaml"])
    cfg = compile_proxy(Inputs(resources, SNAP), GATEWAY)
    table = cfg.route_tables["gateway-80"]
    assert [vh.domains for vh in table.virtual_hosts] == [("*",)]
    router = build_router(table, cfg.settings)

    def dest(path: str) -> str:
        req = RequestView(method="GET", scheme="http", authority="127.0.0.1:8080", path=path, headers=[], port=80,
                          gateway="default/bookinfo-gateway")
        d = router.decide(req, random.Random(0))
        assert isinstance(d, Forward), d
        return d.destination.destination.host

    assert dest("/.well-known/acme-challenge/token") == "cert-manager-resolver.istio-system.svc.cluster.local"
    assert dest("/productpage") == FQ.format("productpage")


@pytest.mark.parametrize("server_host, bound", [("*", True), ("default/*", True), ("./*", True), ("*/*", True),
                                                 ("prod/*", False), ("istio-system/*", False)])
def test_the_namespace_part_of_a_gateway_server_host_says_where_its_virtual_services_may_live(server_host, bound):
    # Istio's Bookinfo gateway with its server's hosts written as namespace/host: a VirtualService
    # of namespace default binds only where that namespace is admitted (the part was ignored).
    text = (RULES / "bookinfo-gateway.yaml").read_text()
    assert '    hosts:\n    - "*"\n---' in text
    text = text.replace('    hosts:\n    - "*"\n---', f'    hosts:\n    - "{server_host}"\n---', 1)
    cfg = compile_proxy(Inputs(load_resources_text(text, file="gw.yaml"), SNAP), GATEWAY)
    vhosts = cfg.route_tables["gateway-80"].virtual_hosts
    assert [vh.name for vh in vhosts] == (["default/bookinfo:80"] if bound else [])


def test_virtual_service_bound_only_to_a_gateway_does_not_apply_to_sidecars():
    cfg = compile_with("bookinfo-gateway.yaml")
    vh = vhost(cfg, "productpage")
    assert vh.routes[0].name == "default"


def test_gateway_with_a_selector_for_other_labels_gets_no_listener():
    other = Node(Workload(name="gw2", service="gw2", labels=FrozenDict(istio="egress")), GATEWAY.listeners, gateway=True)
    cfg = compile_with("bookinfo-gateway.yaml", node=other)
    assert "gateway-80" not in cfg.route_tables
    assert [l for l in cfg.listeners if l.direction == "gateway"] == []


def test_version_is_a_content_hash_stable_across_compiles_and_changed_by_rules():
    a = compile_with("destination-rule-all.yaml")
    b = compile_with("destination-rule-all.yaml")
    c = compile_with("destination-rule-all.yaml", "virtual-service-reviews-v3.yaml")
    assert a.version == b.version != c.version


def test_compiled_config_round_trips_through_json():
    cfg = compile_with("destination-rule-all.yaml", "virtual-service-reviews-50-v3.yaml")
    assert from_data(ProxyConfig, to_data(cfg), path="") == cfg


def test_subset_traffic_policy_overrides_the_top_level_one():
    rs = load_resources_text(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {tcp: {maxConnections: 7}}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
"""
    )
    cfg = compile_proxy(Inputs(rs, SNAP), PRODUCTPAGE)
    v2 = cfg.clusters[cluster_name(FQ.format("reviews"), 9080, "v2")].traffic_policy
    top = cfg.clusters[cluster_name(FQ.format("reviews"), 9080)].traffic_policy
    assert v2.load_balancer.simple == "LEAST_REQUEST"
    assert v2.connection_pool.tcp.max_connections == 7
    assert top.load_balancer.simple == "RANDOM"


@pytest.mark.parametrize(
    "docs, expected",
    [
        ("", "PERMISSIVE"),
        ("{ns: istio-system, spec: {mtls: {mode: STRICT}}}", "STRICT"),
        ("{ns: istio-system, spec: {mtls: {mode: STRICT}}}|{ns: default, spec: {mtls: {mode: DISABLE}}}", "DISABLE"),
        ("{ns: default, spec: {mtls: {mode: PERMISSIVE}}}|{ns: default, spec: {selector: {matchLabels: {app: productpage}}, mtls: {mode: STRICT}}}", "STRICT"),
        ("{ns: default, spec: {selector: {matchLabels: {app: other}}, mtls: {mode: STRICT}}}", "PERMISSIVE"),
    ],
)
def test_peer_authentication_precedence_workload_over_namespace_over_mesh(docs, expected):
    import yaml

    text = ""
    for i, d in enumerate(x for x in docs.split("|") if x):
        obj = yaml.safe_load(d)
        text += (
            f"---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            f"metadata: {{name: pa{i}, namespace: {obj['ns']}}}\nspec: {yaml.safe_dump(obj['spec'], default_flow_style=True)}"
        )
    rs = load_resources_text(text) if text else []
    assert mtls_mode_for(Inputs(rs, SNAP), PRODUCTPAGE.workload, 9080) == expected


JWT_RULES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: ingress-jwt
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  jwtRules:
  - issuer: testing@secure.istio.io
    jwksUri: http://keys.example/jwks.json
---
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata:
  name: productpage-jwt
spec:
  selector:
    matchLabels:
      app: productpage
  jwtRules:
  - issuer: other
    jwks: '{"keys": []}'
"""


def test_request_authentication_by_selector_and_namespace_with_the_keys_pilot_fetched():
    from meshctl.pilot.compile import jwks_wanted

    resources = load_resources_text(JWT_RULES)
    assert jwks_wanted(resources) == [("http://keys.example/jwks.json", 5.0)]
    keys = {"http://keys.example/jwks.json": '{"keys": [1]}'}
    gw = compile_proxy(Inputs(resources, SNAP, jwks=keys), GATEWAY)
    assert list(gw.request_authentication) == ["istio-system/ingress-jwt"]  # root namespace: mesh-wide
    assert dict(gw.jwks) == keys
    pp = compile_proxy(Inputs(resources, SNAP, jwks=keys), PRODUCTPAGE)
    assert list(pp.request_authentication) == ["default/productpage-jwt"]
    assert not pp.jwks
    assert from_data(ProxyConfig, to_data(gw), path="") == gw
    # new keys for the uri: a new config version for the gateway only
    gw2 = compile_proxy(Inputs(resources, SNAP, jwks={"http://keys.example/jwks.json": '{"keys": [2]}'}), GATEWAY)
    assert gw2.version != gw.version


AUTHZ_FOR_GATEWAY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin-at-ingress, namespace: default}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide-deny, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/secret"]}}]}]
"""


def test_a_namespace_wide_policy_of_the_workloads_namespace_does_not_reach_the_ingress_gateway():
    # Istio's authz-http task applies allow-nothing in `default`: it locks the workloads,
    # not the ingress gateway (which runs in istio-system); a policy there that selects
    # the gateway by its labels, and any root-namespace policy, still apply to it.
    resources = load_resources_text(AUTHZ_FOR_GATEWAY)
    gw = compile_proxy(Inputs(resources, SNAP), GATEWAY)
    assert list(gw.authorization) == ["default/deny-admin-at-ingress", "istio-system/mesh-wide-deny"]
    pp = compile_proxy(Inputs(resources, SNAP), PRODUCTPAGE)
    assert list(pp.authorization) == ["default/allow-nothing", "istio-system/mesh-wide-deny"]


@pytest.mark.parametrize("key, expected", [(9080, "DISABLE"), (21001, "DISABLE"), (9999, "STRICT")])
def test_port_level_mtls_is_keyed_by_the_workloads_port_the_service_port_or_the_apps(key, expected):
    # Istio keys portLevelMtls by the workload's (container) port: Bookinfo's 9080. meshctl gives
    # apps a port from portRange (21001 here), and a key of 9080 was accepted and ignored.
    text = f"""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: productpage}}
spec:
  selector: {{matchLabels: {{app: productpage}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls:
    {key}: {{mode: DISABLE}}
"""
    node = Node(PRODUCTPAGE.workload, (
        Listener(name="inbound", direction="inbound", address="127.0.0.1", port=21002, app_address="127.0.0.1",
                 app_port=21001, service_port=9080),))
    cfg = compile_proxy(Inputs(load_resources_text(text, file="pa.yaml"), SNAP), node)
    (inbound,) = [l for l in cfg.listeners if l.direction == "inbound"]
    assert inbound.mtls_mode == expected


def test_a_port_level_mtls_key_no_selected_workload_serves_is_said_at_validate_and_apply():
    # Istio's authn task keys httpbin's container port 80; in meshctl the service port (here
    # productpage's 9080) is what a key must name: 80 would do nothing, and is said so by name.
    from meshctl.pilot.query import port_level_mtls_findings

    def pa(key: int):
        return load_resources_text(f"""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: productpage}}
spec:
  selector: {{matchLabels: {{app: productpage}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls:
    {key}: {{mode: DISABLE}}
""", file="pa.yaml")

    (f,) = port_level_mtls_findings(pa(80), SNAP)
    assert (f.level, f.source, f.field) == ("warning", "pa.yaml:8", "spec.portLevelMtls.80")
    assert "no workload this PeerAuthentication selects serves port 80 (service ports: productpage 9080)" in f.message
    assert port_level_mtls_findings(pa(9080), SNAP) == []
    assert port_level_mtls_findings(pa(80), {}) == []  # no mesh to check against: nothing said
