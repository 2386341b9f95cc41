"""Routing decisions (core/route.py), named after the rule each test proves.

Model objects are built directly (the YAML loader is tested elsewhere);
hosts are the FQDNs pilot hands to proxies.
"""

from __future__ import annotations

import base64
import random

import pytest

from meshctl.core.route import (
    DirectResponse,
    Forward,
    NoRoute,
    Redirect,
    RequestView,
    RouteConfigError,
    Router,
    apply_header_ops,
)
from meshctl.core.routebuild import build_router
from meshctl.core.routeexplain import explain
from meshctl.model.base import Duration, FrozenDict
from meshctl.model.istio import (
    Destination,
    FaultAbort,
    HeaderOperations,
    Headers,
    HTTPBody,
    HTTPDirectResponse,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    HTTPRouteDestination,
    Percent,
    PortSelector,
    RegexRewrite,
    StringMatch,
)
from meshctl.model.proxyconfig import RouteTable, Settings, VirtualHost

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
REVIEWS_DOMAINS = ("reviews", "reviews:9080", REVIEWS, f"{REVIEWS}:9080", "reviews.default", "reviews.default:9080")


def dest(host: str = REVIEWS, subset: str | None = None, weight: int | None = None, port: int = 9080, headers=None):
    return HTTPRouteDestination(
        destination=Destination(host=host, subset=subset, port=PortSelector(number=port)), weight=weight, headers=headers
    )


def exact(v: str) -> StringMatch:
    return StringMatch(exact=v)


def prefix(v: str) -> StringMatch:
    return StringMatch(prefix=v)


def regex(v: str) -> StringMatch:
    return StringMatch(regex=v)


def router(*routes: HTTPRoute, domains=REVIEWS_DOMAINS, name=f"{REVIEWS}:9080", extra=()) -> Router:
    return build_router(RouteTable("outbound", (VirtualHost(name, domains, tuple(routes)), *extra)), Settings())


def req(path: str = "/", authority: str = "reviews:9080", headers=(), method: str = "GET", **kw) -> RequestView:
    return RequestView(method=method, scheme=kw.pop("scheme", "http"), authority=authority, path=path, headers=list(headers), **kw)


def decide(r: Router, request: RequestView, seed: int = 0):
    return r.decide(request, random.Random(seed))


def cluster_of(r: Router, request: RequestView) -> str | None:
    d = decide(r, request)
    return d.cluster if isinstance(d, Forward) else None


# Istio's samples/bookinfo/networking/virtual-service-reviews-test-v2.yaml
REVIEWS_TEST_V2 = (
    HTTPRoute(match=(HTTPMatchRequest(headers=FrozenDict({"end-user": exact("jason")})),), route=(dest(subset="v2"),)),
    HTTPRoute(route=(dest(subset="v1"),)),
)


# ---------------------------------------------------------------- matching


def test_reviews_test_v2_sends_jason_to_v2_and_everyone_else_to_v1():
    r = router(*REVIEWS_TEST_V2)
    assert cluster_of(r, req(headers=[("end-user", "jason")])) == f"outbound|9080|v2|{REVIEWS}"
    assert cluster_of(r, req(headers=[("end-user", "bob")])) == f"outbound|9080|v1|{REVIEWS}"
    assert cluster_of(r, req()) == f"outbound|9080|v1|{REVIEWS}"
    d = decide(r, req(headers=[("end-user", "jason")]))
    assert isinstance(d, Forward)
    assert d.route_index == 0 and d.virtual_host == f"{REVIEWS}:9080"
    assert d.destination.destination.subset == "v2"
    assert d.path == "/" and d.authority == "reviews:9080"


def test_first_matching_route_wins():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(uri=prefix("/api")),), route=(dest(subset="v1"),)),
        HTTPRoute(match=(HTTPMatchRequest(uri=prefix("/api/v2")),), route=(dest(subset="v2"),)),
        HTTPRoute(route=(dest(subset="v3"),)),
    )
    # /api/v2 also matches route 1, but route 0 comes first
    assert cluster_of(r, req("/api/v2/x")).split("|")[2] == "v1"
    assert cluster_of(r, req("/other")).split("|")[2] == "v3"


def test_headers_in_one_match_are_anded_and_matches_are_ored():
    both = HTTPMatchRequest(headers=FrozenDict({"end-user": exact("jason"), "x-beta": exact("1")}))
    alone = HTTPMatchRequest(uri=exact("/beta"))
    r = router(HTTPRoute(match=(both, alone), route=(dest(subset="v2"),)), HTTPRoute(route=(dest(subset="v1"),)))
    v = lambda request: cluster_of(r, request).split("|")[2]  # noqa: E731
    assert v(req(headers=[("end-user", "jason"), ("x-beta", "1")])) == "v2"
    assert v(req(headers=[("end-user", "jason")])) == "v1"  # AND: one condition is not enough
    assert v(req(headers=[("x-beta", "1")])) == "v1"
    assert v(req("/beta")) == "v2"  # OR: the second match alone suffices


def test_empty_match_request_matches_everything():
    r = router(HTTPRoute(match=(HTTPMatchRequest(),), route=(dest(subset="v1"),)))
    assert cluster_of(r, req("/anything", method="DELETE")) is not None


def test_regex_is_full_match():
    r = router(HTTPRoute(match=(HTTPMatchRequest(uri=regex("/reviews/[0-9]+")),), route=(dest(),)))
    assert cluster_of(r, req("/reviews/42")) is not None
    assert cluster_of(r, req("/reviews/42/extra")) is None  # a search would match; a full match does not
    assert cluster_of(r, req("/v1/reviews/42")) is None


def test_ignore_uri_case_applies_to_prefix_and_exact_but_not_regex():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(uri=prefix("/Api/"), ignore_uri_case=True),), route=(dest(subset="p"),)),
        HTTPRoute(match=(HTTPMatchRequest(uri=exact("/Health"), ignore_uri_case=True),), route=(dest(subset="e"),)),
        HTTPRoute(match=(HTTPMatchRequest(uri=regex("/low[a-z]+"), ignore_uri_case=True),), route=(dest(subset="r"),)),
    )
    assert cluster_of(r, req("/API/x")).split("|")[2] == "p"
    assert cluster_of(r, req("/api/x")).split("|")[2] == "p"
    assert cluster_of(r, req("/HEALTH")).split("|")[2] == "e"
    assert cluster_of(r, req("/lowercase")).split("|")[2] == "r"
    assert cluster_of(r, req("/LOWERCASE")) is None
    # without the flag, case matters
    strict = router(HTTPRoute(match=(HTTPMatchRequest(uri=prefix("/Api/")),), route=(dest(),)))
    assert cluster_of(strict, req("/api/x")) is None


def test_uri_is_matched_without_the_query_string():
    r = router(HTTPRoute(match=(HTTPMatchRequest(uri=exact("/productpage")),), route=(dest(),)))
    assert cluster_of(r, req("/productpage?u=normal")) is not None
    d = decide(r, req("/productpage?u=normal"))
    assert d.path == "/productpage?u=normal"  # the query string is still forwarded


def test_header_match_without_value_checks_presence():
    r = router(HTTPRoute(match=(HTTPMatchRequest(headers=FrozenDict({"X-Canary": StringMatch()})),), route=(dest(),)))
    assert cluster_of(r, req(headers=[("x-canary", "")])) is not None
    assert cluster_of(r, req(headers=[("x-canary", "anything")])) is not None
    assert cluster_of(r, req(headers=[("x-other", "1")])) is None


def test_repeated_headers_match_as_one_comma_joined_value():
    r = router(HTTPRoute(match=(HTTPMatchRequest(headers=FrozenDict({"x-tag": exact("a,b")})),), route=(dest(),)))
    assert cluster_of(r, req(headers=[("x-tag", "a"), ("x-tag", "b")])) is not None
    assert cluster_of(r, req(headers=[("x-tag", "a")])) is None


def test_without_headers_matches_when_absent_or_different():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(without_headers=FrozenDict({"end-user": exact("jason")})),), route=(dest(subset="v1"),)),
        HTTPRoute(route=(dest(subset="v2"),)),
    )
    assert cluster_of(r, req()).split("|")[2] == "v1"
    assert cluster_of(r, req(headers=[("end-user", "bob")])).split("|")[2] == "v1"
    assert cluster_of(r, req(headers=[("end-user", "jason")])).split("|")[2] == "v2"
    presence = router(
        HTTPRoute(match=(HTTPMatchRequest(without_headers=FrozenDict({"x-debug": StringMatch()})),), route=(dest(),))
    )
    assert cluster_of(presence, req()) is not None
    assert cluster_of(presence, req(headers=[("x-debug", "1")])) is None


def test_jwt_claim_based_routing_matches_verified_claims_not_headers():
    # Istio's "JWT claim based routing" task: headers["@request.auth.claims.groups"] exact group1
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(headers=FrozenDict({"@request.auth.claims.groups": exact("group1")})),),
                  route=(dest(subset="v2"),)),
        HTTPRoute(match=(HTTPMatchRequest(headers=FrozenDict({"@request.auth.claims.org.name": prefix("acme")}),
                                          without_headers=FrozenDict({"@request.auth.claims.admin": exact("true")})),),
                  route=(dest(subset="v3"),)),
        HTTPRoute(route=(dest(subset="v1"),)),
    )
    v = lambda n: f"outbound|9080|v{n}|{REVIEWS}"  # noqa: E731
    assert cluster_of(r, req(claims={"groups": ["group1", "group2"]})) == v(2)
    assert cluster_of(r, req(claims={"groups": ["group2"]})) == v(1)
    assert cluster_of(r, req(claims={"groups": "group1"})) == v(2)
    assert cluster_of(r, req()) == v(1)  # no JWT
    # a header of that name is not a claim
    assert cluster_of(r, req(headers=[("@request.auth.claims.groups", "group1")])) == v(1)
    assert cluster_of(r, req(claims={"org": {"name": "acme-corp"}})) == v(3)
    assert cluster_of(r, req(claims={"org": {"name": "acme-corp"}, "admin": True})) == v(1)


def test_query_params_match_exact_and_regex_and_treat_prefix_as_presence():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(query_params=FrozenDict({"u": exact("test")})),), route=(dest(subset="e"),)),
        HTTPRoute(match=(HTTPMatchRequest(query_params=FrozenDict({"id": regex("[0-9]+")})),), route=(dest(subset="r"),)),
        HTTPRoute(match=(HTTPMatchRequest(query_params=FrozenDict({"p": prefix("zz")})),), route=(dest(subset="p"),)),
    )
    sub = lambda path: (cluster_of(r, req(path)) or "||none").split("|")[2]  # noqa: E731
    assert sub("/?u=test") == "e"
    assert sub("/?a=1&u=test&b") == "e"
    assert sub("/?u=testing") == "none"
    assert sub("/?id=123") == "r"
    assert sub("/?id=12a") == "none"  # full match
    assert sub("/?p=anything") == "p"  # prefix is unsupported in Istio: presence only
    assert sub("/?q=zz") == "none"
    assert sub("/p/u=test") == "none"  # not a query string


def test_method_scheme_authority_and_port_conditions():
    m = HTTPMatchRequest(method=exact("POST"), scheme=exact("http"), authority=prefix("reviews"), port=9080)
    r = router(HTTPRoute(match=(m,), route=(dest(),)))
    assert cluster_of(r, req(method="POST", port=9080)) is not None
    assert cluster_of(r, req(method="GET", port=9080)) is None
    assert cluster_of(r, req(method="POST", port=9081)) is None
    assert cluster_of(r, req(method="POST", port=9080, scheme="https")) is None
    assert cluster_of(r, req(method="POST", port=9080, authority=f"{REVIEWS}:9080")) is not None


def test_source_labels_and_source_namespace_select_the_caller():
    m = HTTPMatchRequest(source_labels=FrozenDict({"app": "productpage", "version": "v1"}), source_namespace="default")
    r = router(HTTPRoute(match=(m,), route=(dest(subset="v2"),)), HTTPRoute(route=(dest(subset="v1"),)))
    pp = FrozenDict({"app": "productpage", "version": "v1", "extra": "x"})
    assert cluster_of(r, req(source_labels=pp, source_namespace="default")).split("|")[2] == "v2"
    assert cluster_of(r, req(source_labels=pp, source_namespace="prod")).split("|")[2] == "v1"
    assert cluster_of(r, req(source_labels=FrozenDict({"app": "productpage"}), source_namespace="default")).split("|")[2] == "v1"


def test_match_gateways_select_by_arrival_gateway_and_mesh_means_sidecars():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(gateways=("istio-system/bookinfo-gateway",)),), route=(dest(subset="gw"),)),
        HTTPRoute(match=(HTTPMatchRequest(gateways=("mesh",)),), route=(dest(subset="mesh"),)),
        HTTPRoute(match=(HTTPMatchRequest(gateways=("other-gateway",)),), route=(dest(subset="short"),)),
    )
    assert cluster_of(r, req(gateway="istio-system/bookinfo-gateway")).split("|")[2] == "gw"
    assert cluster_of(r, req()).split("|")[2] == "mesh"
    assert cluster_of(r, req(gateway="default/other-gateway")).split("|")[2] == "short"
    assert cluster_of(r, req(gateway="default/unknown")) is None


# ---------------------------------------------------------------- virtual hosts


def _vh(name: str, domains: tuple[str, ...], subset: str) -> VirtualHost:
    return VirtualHost(name, domains, (HTTPRoute(route=(dest(subset=subset),)),))


def test_virtual_host_exact_domain_beats_longest_wildcard_beats_catch_all():
    table = RouteTable(
        "gateway-8080",
        (
            _vh("all", ("*",), "default"),
            _vh("wide", ("*.example.com",), "wide"),
            _vh("narrow", ("*.api.example.com",), "narrow"),
            _vh("exact", ("www.api.example.com",), "exact"),
            _vh("pfx", ("shop.*",), "pfx"),
        ),
    )
    r = build_router(table, Settings())
    sub = lambda a: cluster_of(r, req(authority=a)).split("|")[2]  # noqa: E731
    assert sub("www.api.example.com") == "exact"
    assert sub("WWW.API.Example.com") == "exact"  # domains are case-insensitive
    assert sub("v1.api.example.com") == "narrow"
    assert sub("foo.example.com") == "wide"
    assert sub("shop.local") == "pfx"
    assert sub("example.com") == "default"  # a wildcard needs at least one character
    assert sub("elsewhere:8080") == "default"


def test_authority_port_is_part_of_the_domain():
    r = router(*REVIEWS_TEST_V2, domains=("reviews:9080",))
    assert cluster_of(r, req(authority="reviews:9080")) is not None
    assert isinstance(decide(r, req(authority="reviews")), NoRoute)


def test_unknown_authority_is_404_naming_it():
    d = decide(router(*REVIEWS_TEST_V2), req(authority="details:9080"))
    assert d == NoRoute(404, "no virtual host for details:9080")


def test_no_matching_route_is_404():
    r = router(HTTPRoute(match=(HTTPMatchRequest(uri=prefix("/api")),), route=(dest(),)))
    d = decide(r, req("/web"))
    assert isinstance(d, NoRoute) and d.status == 404 and "no route matched" in d.reason


def test_duplicate_domain_goes_to_the_first_virtual_host_with_a_warning():
    r = router(*REVIEWS_TEST_V2, extra=(_vh("second", ("reviews:9080", "reviews-alias"), "second"),))
    assert cluster_of(r, req(authority="reviews:9080")).split("|")[2] == "v1"
    assert cluster_of(r, req(authority="reviews-alias")).split("|")[2] == "second"
    assert any("'reviews:9080'" in w and "second" in w for w in r.warnings)


# ---------------------------------------------------------------- weights


def test_reviews_50_v3_splits_traffic_by_weight_with_the_injected_random():
    # samples/bookinfo/networking/virtual-service-reviews-50-v3.yaml
    r = router(HTTPRoute(route=(dest(subset="v1", weight=50), dest(subset="v3", weight=50))))
    rand = random.Random(1234)
    counts = {"v1": 0, "v3": 0}
    for _ in range(10_000):
        counts[r.decide(req(), rand).destination.destination.subset] += 1
    # binomial(10000, .5) has sd 50: allow 4 sd
    assert abs(counts["v1"] - 5000) <= 200, counts
    # same seed, same sequence of choices
    a = [r.decide(req(), random.Random(5)).cluster for _ in range(3)]
    b = [r.decide(req(), random.Random(5)).cluster for _ in range(3)]
    assert a == b


def test_uneven_weights_follow_their_ratio_and_zero_weight_is_never_picked():
    r = router(HTTPRoute(route=(dest(subset="v1", weight=80), dest(subset="v2", weight=20), dest(subset="v3", weight=0))))
    rand = random.Random(99)
    counts = {"v1": 0, "v2": 0, "v3": 0}
    for _ in range(10_000):
        counts[r.decide(req(), rand).destination.destination.subset] += 1
    assert counts["v3"] == 0
    assert abs(counts["v2"] - 2000) <= 160, counts  # sd 40


def test_single_destination_without_weight_gets_all_traffic():
    r = router(HTTPRoute(route=(dest(subset="v1"),)))
    rand = random.Random(3)
    assert {r.decide(req(), rand).cluster for _ in range(200)} == {f"outbound|9080|v1|{REVIEWS}"}


def test_destination_without_port_takes_the_virtual_host_port():
    d = HTTPRouteDestination(destination=Destination(host=REVIEWS, subset="v1"))
    r = router(HTTPRoute(route=(d,)))
    assert cluster_of(r, req()) == f"outbound|9080|v1|{REVIEWS}"


# ---------------------------------------------------------------- rewrite


def test_uri_rewrite_replaces_the_matched_prefix_and_keeps_the_query():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(uri=prefix("/ratings")),), rewrite=HTTPRewrite(uri="/v1/bookRatings"), route=(dest(),))
    )
    assert decide(r, req("/ratings/2?x=1")).path == "/v1/bookRatings/2?x=1"


def test_uri_rewrite_after_case_insensitive_prefix_replaces_prefix_length():
    m = HTTPMatchRequest(uri=prefix("/API/"), ignore_uri_case=True)
    r = router(HTTPRoute(match=(m,), rewrite=HTTPRewrite(uri="/"), route=(dest(),)))
    assert decide(r, req("/api/Items")).path == "/Items"


def test_uri_rewrite_replaces_the_whole_path_for_exact_and_regex_matches():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(uri=exact("/old")),), rewrite=HTTPRewrite(uri="/new/place"), route=(dest(),)),
        HTTPRoute(match=(HTTPMatchRequest(uri=regex("/r/[0-9]+")),), rewrite=HTTPRewrite(uri="/number"), route=(dest(),)),
    )
    assert decide(r, req("/old?q=1")).path == "/new/place?q=1"
    assert decide(r, req("/r/77")).path == "/number"


def test_uri_rewrite_without_uri_match_replaces_the_root_prefix_like_envoy():
    r = router(HTTPRoute(rewrite=HTTPRewrite(uri="/v2/"), route=(dest(),)))
    assert decide(r, req("/items")).path == "/v2/items"


def test_uri_regex_rewrite_substitutes_groups_in_the_path():
    rw = HTTPRewrite(uri_regex_rewrite=RegexRewrite(match=r"^/service/([^/]+)(/.*)$", rewrite=r"\2/instance/\1"))
    r = router(HTTPRoute(rewrite=rw, route=(dest(),)))
    assert decide(r, req("/service/foo/v1/api?x=y")).path == "/v1/api/instance/foo?x=y"


def test_authority_rewrite_changes_authority_and_host_header():
    r = router(HTTPRoute(rewrite=HTTPRewrite(authority="ratings.internal"), route=(dest(),)))
    d = decide(r, req(headers=[("host", "reviews:9080"), ("accept", "*/*")]))
    assert d.authority == "ratings.internal"
    assert d.request_headers == [("host", "ratings.internal"), ("accept", "*/*")]


# ---------------------------------------------------------------- redirect, direct response


def test_redirect_defaults_to_301_and_keeps_host_and_query():
    r = router(HTTPRoute(match=(HTTPMatchRequest(uri=exact("/v1/getProductRatings")),), redirect=HTTPRedirect(uri="/v1/bookRatings")))
    d = decide(r, req("/v1/getProductRatings?id=1"))
    assert d == Redirect(status=301, location="http://reviews:9080/v1/bookRatings?id=1", route_index=0)


@pytest.mark.parametrize(
    ("redirect", "authority", "location"),
    [
        (HTTPRedirect(authority="newratings.default.svc.cluster.local"), "reviews:9080", "http://newratings.default.svc.cluster.local:9080/p"),
        (HTTPRedirect(scheme="https"), "shop.example.com", "https://shop.example.com/p"),
        (HTTPRedirect(scheme="https"), "shop.example.com:80", "https://shop.example.com/p"),
        (HTTPRedirect(scheme="https", port=8443), "shop.example.com:80", "https://shop.example.com:8443/p"),
        (HTTPRedirect(port=80), "shop.example.com:8080", "http://shop.example.com/p"),
        (HTTPRedirect(derive_port="FROM_PROTOCOL_DEFAULT"), "shop.example.com:8080", "http://shop.example.com/p"),
        (HTTPRedirect(authority="other:81", redirect_code=308), "shop.example.com", "http://other:81/p"),
    ],
)
def test_redirect_location_replaces_authority_port_and_scheme(redirect, authority, location):
    r = router(HTTPRoute(redirect=redirect), domains=("*",))
    d = decide(r, req("/p", authority=authority))
    assert isinstance(d, Redirect) and d.location == location
    assert d.status == (redirect.redirect_code or 301)


def test_direct_response_returns_string_or_base64_body_with_response_headers():
    r = router(
        HTTPRoute(
            match=(HTTPMatchRequest(uri=exact("/teapot")),),
            direct_response=HTTPDirectResponse(status=418, body=HTTPBody(string="I'm a teapot")),
            headers=Headers(response=HeaderOperations(set=FrozenDict({"x-served-by": "mesh"}))),
        ),
        HTTPRoute(direct_response=HTTPDirectResponse(status=503, body=HTTPBody(bytes=base64.b64encode(b"\x00\xffdown").decode()))),
    )
    d = decide(r, req("/teapot"))
    assert d == DirectResponse(418, b"I'm a teapot", [("content-type", "text/plain"), ("x-served-by", "mesh")], 0)
    d2 = decide(r, req("/x"))
    assert isinstance(d2, DirectResponse) and d2.status == 503 and d2.body == b"\x00\xffdown" and d2.route_index == 1
    # callers may mutate what they get without changing the next decision
    d.headers.append(("x", "y"))
    assert decide(r, req("/teapot")).headers == [("content-type", "text/plain"), ("x-served-by", "mesh")]


# ---------------------------------------------------------------- headers, timeouts, retries, faults


def test_apply_header_ops_removes_then_sets_then_adds():
    ops = HeaderOperations(
        set=FrozenDict({"X-Version": "v2"}), add=FrozenDict({"x-tag": "b"}), remove=("X-Secret",)
    )
    headers = [("x-version", "v1"), ("x-secret", "s"), ("x-tag", "a"), ("x-version", "v0")]
    assert apply_header_ops(headers, ops) == [("x-tag", "a"), ("x-version", "v2"), ("x-tag", "b")]
    assert headers == [("x-version", "v1"), ("x-secret", "s"), ("x-tag", "a"), ("x-version", "v0")]  # not mutated
    assert apply_header_ops(headers, None) is headers


def test_route_and_destination_header_ops_both_apply_destination_last():
    route_ops = Headers(
        request=HeaderOperations(set=FrozenDict({"x-level": "route"}), add=FrozenDict({"x-route": "1"})),
        response=HeaderOperations(remove=("server",)),
    )
    dest_ops = Headers(
        request=HeaderOperations(set=FrozenDict({"x-level": "destination"})),
        response=HeaderOperations(set=FrozenDict({"x-subset": "v1"})),
    )
    r = router(HTTPRoute(headers=route_ops, route=(dest(subset="v1", headers=dest_ops),)))
    d = decide(r, req(headers=[("x-level", "client")]))
    assert d.request_headers == [("x-route", "1"), ("x-level", "destination")]
    assert d.response_ops == (route_ops.response, dest_ops.response)
    assert apply_header_ops(apply_header_ops([("server", "app")], d.response_ops[0]), d.response_ops[1]) == [("x-subset", "v1")]


def test_timeout_zero_or_unset_means_none_and_retries_come_from_the_route():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(uri=prefix("/slow")),), timeout=Duration(0.5), route=(dest(),),
                  retries=HTTPRetry(attempts=3, per_try_timeout=Duration(2.0), retry_on="gateway-error")),
        HTTPRoute(match=(HTTPMatchRequest(uri=prefix("/zero")),), timeout=Duration(0.0), route=(dest(),)),
        HTTPRoute(route=(dest(),)),
    )
    slow = decide(r, req("/slow"))
    assert slow.timeout == 0.5
    assert slow.retry.attempts == 3 and slow.retry.per_try_timeout == 2.0 and slow.retry.retry_on == {"gateway-error"}
    assert decide(r, req("/zero")).timeout is None
    default = decide(r, req("/"))
    assert default.timeout is None
    assert default.retry.attempts == 2 and default.retry.retriable_status_codes == {503}


def test_fault_is_passed_to_the_proxy():
    # samples/bookinfo/networking/virtual-service-ratings-test-abort.yaml
    fault = HTTPFaultInjection(abort=FaultAbort(http_status=500, percentage=Percent(100.0)))
    r = build_router(
        RouteTable("outbound", (VirtualHost(f"{RATINGS}:9080", ("ratings:9080",), (
            HTTPRoute(match=(HTTPMatchRequest(headers=FrozenDict({"end-user": exact("jason")})),), fault=fault,
                      route=(dest(RATINGS, "v1"),)),
            HTTPRoute(route=(dest(RATINGS, "v1"),)),
        )),)),
        Settings(),
    )
    assert decide(r, req(authority="ratings:9080", headers=[("end-user", "jason")])).fault == fault
    assert decide(r, req(authority="ratings:9080")).fault is None


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (HTTPRoute(name="bad", match=(HTTPMatchRequest(uri=regex("/(unclosed")),), route=(dest(),)), "route 0 'bad'.*invalid regex '/\\(unclosed'"),
        (HTTPRoute(match=(HTTPMatchRequest(uri=StringMatch(exact="/a", prefix="/a")),), route=(dest(),)), "only one of exact/prefix/regex"),
        (HTTPRoute(direct_response=HTTPDirectResponse(status=200, body=HTTPBody(bytes="not base64!"))), "not valid base64"),
        (HTTPRoute(headers=Headers(request=HeaderOperations(set=FrozenDict({"Host": "x"}))), route=(dest(),)), "cannot change 'host'"),
        (HTTPRoute(route=(dest(weight=0), dest(weight=0))), "sum to 0"),
        (HTTPRoute(route=(dest(),), retries=HTTPRetry(attempts=2, retry_on="sometimes")), "retries.*'sometimes'"),
        (HTTPRoute(), "has no route, redirect or directResponse"),
        (HTTPRoute(redirect=HTTPRedirect(uri="/x"), route=(dest(),)), "redirect and route"),
        (HTTPRoute(redirect=HTTPRedirect(redirect_code=200)), "redirectCode 200"),
    ],
)
def test_bad_routes_are_rejected_when_compiled_naming_the_cause(route, message):
    with pytest.raises(RouteConfigError, match=message):
        router(route)


def test_destination_without_any_port_is_rejected():
    d = HTTPRouteDestination(destination=Destination(host=REVIEWS))
    with pytest.raises(RouteConfigError, match="names no port"):
        router(HTTPRoute(route=(d,)), name=REVIEWS)


# ---------------------------------------------------------------- explain


def test_explain_names_the_virtual_host_each_route_tried_and_the_choice():
    r = router(*REVIEWS_TEST_V2)
    lines = explain(r, req("/reviews/0", headers=[("end-user", "bob")]))
    text = "\n".join(lines)
    assert "virtual host 'reviews.default.svc.cluster.local:9080', selected by exact domain 'reviews:9080'" in text
    assert "route 0: no match" in text
    assert "header 'end-user' is 'bob', which does not equal 'jason'" in text
    assert "route 1: matches (no match conditions)" in text
    assert f"forward to outbound|9080|v1|{REVIEWS} (100% of requests)" in text
    jason = "\n".join(explain(r, req(headers=[("end-user", "jason")])))
    assert "route 0: matches by match 0 (header 'end-user' equal 'jason')" in jason
    absent = "\n".join(explain(router(REVIEWS_TEST_V2[0]), req()))
    assert "header 'end-user' is absent (wanted: equal 'jason')" in absent
    assert "no route matched" in absent
    assert "no virtual host for 'nowhere'" in "\n".join(explain(r, req(authority="nowhere")))


def test_explain_shows_weights_rewrites_and_retries():
    r = router(
        HTTPRoute(rewrite=HTTPRewrite(uri="/v2/"), route=(dest(subset="v1", weight=50), dest(subset="v3", weight=50)),
                  retries=HTTPRetry(attempts=3, retry_on="5xx"))
    )
    text = "\n".join(explain(r, req("/x")))
    assert f"outbound|9080|v1|{REVIEWS} (50% of requests)" in text
    assert f"outbound|9080|v3|{REVIEWS} (50% of requests)" in text
    assert "path rewritten to /v2/x" in text
    assert "retries: up to 3 on 5xx" in text


def test_explain_describes_redirects_direct_responses_and_without_headers():
    r = router(
        HTTPRoute(match=(HTTPMatchRequest(without_headers=FrozenDict({"x-debug": exact("1")})),),
                  redirect=HTTPRedirect(uri="/moved", redirect_code=302)),
        HTTPRoute(direct_response=HTTPDirectResponse(status=503, body=HTTPBody(string="down"))),
    )
    first = "\n".join(explain(r, req("/p?q=1")))
    assert "→ redirect 302 to http://reviews:9080/moved?q=1" in first
    second = "\n".join(explain(r, req("/p", headers=[("x-debug", "1")])))
    assert "header 'x-debug' is '1' and must not equal '1' (withoutHeaders)" in second
    assert "→ direct response 503 with a 4-byte body" in second


def test_virtual_host_lookup_is_exposed_for_callers():
    r = router(*REVIEWS_TEST_V2)
    assert r.virtual_host("Reviews:9080").name == f"{REVIEWS}:9080"
    assert r.virtual_host("details") is None
