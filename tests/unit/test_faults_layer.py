"""Injected faults (pilot/faults.py): which are in force, how they layer over the
user's routes, and what the compiled config does with a request (core.route)."""

from __future__ import annotations

import json
import random

import pytest

from meshctl.core.fault import decide_fault
from meshctl.core.route import Forward, RequestView
from meshctl.core.routebuild import build_router
from meshctl.core.routeexplain import explain
from meshctl.model.base import FrozenDict
from meshctl.model.istio import (
    Destination,
    HTTPDirectResponse,
    HTTPMatchRequest,
    HTTPRoute,
    HTTPRouteDestination,
    StringMatch,
)
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import Inputs, Node, compile_proxy
from meshctl.pilot.faults import (
    FaultError,
    FaultStore,
    active_faults,
    and_match,
    describe,
    describe_match,
    layer_faults,
    new_fault,
    next_expiry,
    parse_match,
)
from meshctl.pilot.store import resource_from_dict
from meshctl.registry.base import Instance

RATINGS = "ratings.default.svc.cluster.local"
REVIEWS = "reviews.default.svc.cluster.local"


def fault(id="f1", service=RATINGS, now=100.0, **kw):
    kw.setdefault("delay", "2s")
    return new_fault(id=id, service=service, now=now, **kw)


def route(subset=None, *, name=None, match=(), host=RATINGS, dests=None):
    rd = dests or (HTTPRouteDestination(destination=Destination(host=host, subset=subset)),)
    return HTTPRoute(name=name, match=tuple(match), route=rd)


def hdr(**h):
    return HTTPMatchRequest(headers=FrozenDict({k.replace("_", "-"): StringMatch(exact=v) for k, v in h.items()}))


# ------------------------------------------------------------------ active_faults


def test_a_fault_is_in_force_until_its_expiry_and_not_at_it():
    f = fault(ttl="3s", now=100.0)
    assert active_faults([f], 102.999) == (f,)
    assert active_faults([f], 103.0) == ()


def test_a_fault_without_ttl_never_expires():
    f = fault()
    assert f.expires is None
    assert active_faults([f], 1e12) == (f,)


def test_active_faults_are_newest_first():
    old, new = fault("a", now=10.0), fault("b", now=20.0)
    assert [f.id for f in active_faults([old, new], 30.0)] == ["b", "a"]


def test_next_expiry_is_the_soonest_future_one():
    fs = [fault("a", ttl="10s"), fault("b", ttl="3s"), fault("c")]
    assert next_expiry(fs, 100.0) == 103.0
    assert next_expiry(fs, 105.0) == 110.0
    assert next_expiry(fs, 111.0) is None


# ------------------------------------------------------------------ layering


def test_a_fault_over_the_default_route_faults_every_request():
    r = route()
    out = layer_faults((r,), (fault(),))
    assert len(out) == 2
    assert out[1] == r  # the user's route is kept, after the copy
    assert out[0].fault is not None and out[0].fault.delay.fixed_delay == 2.0
    assert out[0].match == () and out[0].route == r.route


def test_the_fault_match_is_anded_with_each_user_match():
    r = route(match=(HTTPMatchRequest(uri=StringMatch(prefix="/ratings")), hdr(x_canary="1")))
    out = layer_faults((r,), (fault(match=["header:end-user=jason"]),))
    copy = out[0]
    assert len(copy.match) == 2
    assert copy.match[0].uri == StringMatch(prefix="/ratings")
    assert copy.match[0].headers == {"end-user": StringMatch(exact="jason")}
    assert copy.match[1].headers == {"x-canary": StringMatch(exact="1"), "end-user": StringMatch(exact="jason")}


def test_a_match_that_cannot_hold_with_the_fault_gets_no_copy():
    jason = route(match=(hdr(end_user="jason"),), subset="v2")
    rest = route(subset="v1")
    out = layer_faults((jason, rest), (fault(match=["header:end-user=bob"]),))
    # bob never matches the jason route, so only the catch-all route is faulted.
    assert [r.fault is not None for r in out] == [False, True, False]
    assert out[1].match[0].headers == {"end-user": StringMatch(exact="bob")}


def test_exact_within_a_prefix_keeps_the_exact_value():
    m = and_match(HTTPMatchRequest(uri=StringMatch(prefix="/api")), HTTPMatchRequest(uri=StringMatch(exact="/api/v1")))
    assert m is not None and m.uri == StringMatch(exact="/api/v1")
    assert and_match(HTTPMatchRequest(uri=StringMatch(prefix="/api")), HTTPMatchRequest(uri=StringMatch(exact="/x"))) is None
    m = and_match(HTTPMatchRequest(uri=StringMatch(prefix="/a")), HTTPMatchRequest(uri=StringMatch(prefix="/a/b")))
    assert m is not None and m.uri == StringMatch(prefix="/a/b")


def test_subset_faults_only_routes_to_that_subset():
    v1, v2 = route("v1", match=(hdr(end_user="jason"),)), route("v2")
    out = layer_faults((v1, v2), (fault(subset="v2"),))
    assert [(r.route[0].destination.subset, r.fault is not None) for r in out] == [("v1", False), ("v2", True), ("v2", False)]


def test_a_split_route_with_the_subset_is_faulted_whole():
    split = route(dests=(
        HTTPRouteDestination(destination=Destination(host=RATINGS, subset="v1"), weight=50),
        HTTPRouteDestination(destination=Destination(host=RATINGS, subset="v2"), weight=50),
    ))
    out = layer_faults((split,), (fault(subset="v2"),))
    assert out[0].fault is not None and out[0].route == split.route


def test_direct_responses_are_not_faulted():
    d = HTTPRoute(direct_response=HTTPDirectResponse(status=418))
    assert layer_faults((d,), (fault(),)) == (d,)


def test_two_faults_newest_first_each_before_the_route():
    r = route()
    a, b = fault("a", now=1.0, delay="1s"), fault("b", now=2.0, abort=503, delay=None)
    out = layer_faults((r,), active_faults([a, b], 3.0))
    assert [x.name for x in out] == ["inject-fault b over route 0", "inject-fault a over route 0", None]


def test_with_a_host_only_routes_to_that_host_are_faulted():
    to_ratings, to_reviews = route(host=RATINGS), route(host=REVIEWS)
    out = layer_faults((to_reviews, to_ratings), (fault(),), host=RATINGS)
    assert [(r.route[0].destination.host, r.fault is not None) for r in out] == [
        (REVIEWS, False), (RATINGS, True), (RATINGS, False)]


# ------------------------------------------------------------------ CLI text


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"delay": None}, "--delay"),
        ({"delay": "soon"}, "bad --delay"),
        ({"delay": "0s"}, "at least 1ms"),
        ({"percent": 101.0}, "between 0 and 100"),
        ({"percent": -1.0}, "between 0 and 100"),
        ({"delay": None, "abort": 600}, "200-599"),
        ({"delay": None, "abort": 99}, "200-599"),
        ({"ttl": "forever"}, "bad --ttl"),
        ({"ttl": "0s"}, "more than 0s"),
        ({"match": ["cookie:user=jason"]}, "bad --match"),
        ({"match": ["header:end-user"]}, "bad --match"),
        ({"match": ["header:a~=("]}, "bad regex"),
    ],
)
def test_bad_cli_values_are_named(kw, message):
    with pytest.raises(FaultError, match=message.replace("(", r"\(")):
        fault(**kw)


def test_parse_match_forms():
    m = parse_match(["header:End-User=jason", "header:x-v^=canary", "uri:/ratings", "method:get"])
    assert m.headers == {"end-user": StringMatch(exact="jason"), "x-v": StringMatch(prefix="canary")}
    assert m.uri == StringMatch(prefix="/ratings") and m.method == StringMatch(exact="GET")
    assert parse_match(["uri:=/x"]).uri == StringMatch(exact="/x")
    assert parse_match([]) is None


def test_descriptions_say_what_a_user_asked_for():
    f = fault(delay="2s", abort=503, percent=50.0, match=["header:end-user=jason"])
    assert describe(f) == "delay 2s for 50%, abort 503 for 50%"
    assert describe_match(f.match) == "header:end-user=jason"
    assert describe_match(None) == "all requests"


# ------------------------------------------------------------------ the file


def test_store_round_trip_and_expired_faults_are_dropped(tmp_path):
    store = FaultStore(tmp_path)
    assert store.load() == []
    a = fault("a", ttl="1s", now=100.0, match=["header:end-user=jason"], subset="v1")
    b = fault("b", now=100.0, abort=503, delay=None)
    store.add(a, 100.0)
    store.add(b, 100.0)
    assert store.load() == [a, b]
    assert json.loads((tmp_path / "faults.json").read_text())["faults"][0]["match"] == {"headers": {"end-user": {"exact": "jason"}}}
    assert store.prune(100.5) is False
    assert store.prune(101.0) is True
    assert store.load() == [b]
    assert store.remove(lambda f: f.id == "b", 102.0) == [b]
    assert store.load() == []


def test_a_corrupt_file_is_reported_with_its_path(tmp_path):
    (tmp_path / "faults.json").write_text("{not json")
    with pytest.raises(FaultError, match="faults.json: corrupt"):
        FaultStore(tmp_path).load()


# ------------------------------------------------------------------ compiled and routed


def _inputs(faults=()):
    vs = resource_from_dict({
        "apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService", "metadata": {"name": "ratings"},
        "spec": {"hosts": ["ratings"], "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": "ratings", "subset": "v1"}}]},
            {"route": [{"destination": {"host": "ratings", "subset": "v1"}}]},
        ]},
    })
    dr = resource_from_dict({
        "apiVersion": "networking.istio.io/v1alpha3", "kind": "DestinationRule", "metadata": {"name": "ratings"},
        "spec": {"host": "ratings", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
    })
    snap = {"ratings": (Instance(id="ratings-v1-0", service="ratings", address="127.0.0.1", port=9000,
                                 labels=FrozenDict({"version": "v1"}),
                                 meta=FrozenDict({"meshctl.io/service-port": "9080"})),)}
    return Inputs([vs, dr], snap, faults=tuple(faults))


NODE = Node(workload=Workload(name="reviews-v2-0", service="reviews"),
            listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=15001),))


def _decide(cfg, user):
    headers = [("end-user", user)] if user else []
    req = RequestView(method="GET", scheme="http", authority="ratings:9080", path="/ratings/0", headers=headers, port=9080)
    router = build_router(cfg.route_tables["outbound"], cfg.settings)
    d = router.decide(req, random.Random(1))
    assert isinstance(d, Forward)
    return d, explain(router, req)


def test_compiled_config_delays_only_jason_and_routes_as_the_user_said():
    f = fault(match=["header:end-user=jason"], delay="2s")
    cfg = compile_proxy(_inputs([f]), NODE)
    d, lines = _decide(cfg, "jason")
    assert decide_fault(d.route.fault, random.Random(0)).delay == 2.0
    assert d.cluster == "outbound|9080|v1|" + RATINGS
    assert any("inject-fault f1" in line for line in lines)
    d, _ = _decide(cfg, "bob")
    assert not decide_fault(d.route.fault, random.Random(0))
    assert d.cluster == "outbound|9080|v1|" + RATINGS


def test_without_faults_the_config_is_the_same_as_before():
    plain = compile_proxy(_inputs(), NODE)
    expired = active_faults([fault(ttl="1s", now=0.0)], 5.0)
    assert compile_proxy(_inputs(expired), NODE).version == plain.version
    assert compile_proxy(_inputs([fault()]), NODE).version != plain.version


def test_a_fault_on_productpage_applies_at_the_ingress_gateway_too():
    from pathlib import Path

    from meshctl.loader.resources import load_resources

    rules = Path(__file__).parents[2] / "examples" / "bookinfo" / "rules"
    resources = load_resources([rules / "bookinfo-gateway.yaml"])
    snap = {"productpage": (Instance(id="productpage-v1-0", service="productpage", address="127.0.0.1", port=9001,
                                     labels=FrozenDict({"version": "v1"}),
                                     meta=FrozenDict({"meshctl.io/service-port": "9080"})),)}
    gw = Node(Workload(name="gw", service="istio-ingressgateway", labels=FrozenDict(istio="ingressgateway")),
              (Listener(name="gateway-80", direction="gateway", address="127.0.0.1", port=8080, service_port=80),),
              gateway=True)
    f = fault(service="productpage.default.svc.cluster.local", delay=None, abort=503)
    plain = compile_proxy(Inputs(resources, snap), gw).route_tables["gateway-80"].virtual_hosts[0].routes
    faulted = compile_proxy(Inputs(resources, snap, faults=(f,)), gw).route_tables["gateway-80"].virtual_hosts[0].routes
    # Every gateway route goes to productpage: each gets a faulted copy right before it.
    assert len(faulted) == 2 * len(plain)
    assert faulted[1::2] == plain
    assert all(r.fault is not None and r.fault.abort.http_status == 503 for r in faulted[0::2])
    # A fault on another service leaves the gateway alone.
    other = fault(service=RATINGS)
    assert compile_proxy(Inputs(resources, snap, faults=(other,)), gw).route_tables["gateway-80"].virtual_hosts[0].routes == plain


def test_a_damaged_entry_is_reported_not_crashed_on(tmp_path):
    (tmp_path / "faults.json").write_text(json.dumps({"faults": [{"id": "x", "service": RATINGS, "fault": {"delay": {"fixedDelay": "soon"}}}]}))
    with pytest.raises(FaultError, match="bad injected fault"):
        FaultStore(tmp_path).load()
