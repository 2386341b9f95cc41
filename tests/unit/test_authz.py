"""Authorization decision tables: Istio's authz-http task for Bookinfo, then each rule of the semantics."""

from __future__ import annotations

import pytest

from meshctl.core.authz import (
    AuthzRequest,
    RequestAuth,
    applicable,
    authorize,
    custom_check,
    normalize_path,
    selector_matches,
    validate_policy,
)
from meshctl.model.base import FrozenDict
from meshctl.model.istio import (
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    RuleFrom,
    RuleTo,
    Source,
    WorkloadSelector,
)

TD = "cluster.local"


def sa(name: str, ns: str = "default") -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


def sel(**labels) -> WorkloadSelector:
    return WorkloadSelector(match_labels=FrozenDict(labels))


def viewer(app: str, principals: tuple[str, ...] = ()) -> AuthorizationPolicy:
    src = (RuleFrom(source=Source(principals=principals)),) if principals else ()
    return AuthorizationPolicy(
        selector=sel(app=app),
        action="ALLOW",
        rules=(Rule(from_=src, to=(RuleTo(operation=Operation(methods=("GET",))),)),),
    )


# Istio's samples from https://istio.io/latest/docs/tasks/security/authorization/authz-http/
ALLOW_NOTHING = ("default", "allow-nothing", AuthorizationPolicy())  # spec: {}
PRODUCTPAGE_VIEWER = ("default", "productpage-viewer", viewer("productpage"))
DETAILS_VIEWER = ("default", "details-viewer", viewer("details", ("cluster.local/ns/default/sa/bookinfo-productpage",)))
REVIEWS_VIEWER = ("default", "reviews-viewer", viewer("reviews", ("cluster.local/ns/default/sa/bookinfo-productpage",)))
RATINGS_VIEWER = ("default", "ratings-viewer", viewer("ratings", ("cluster.local/ns/default/sa/bookinfo-reviews",)))
ALL = [ALLOW_NOTHING, PRODUCTPAGE_VIEWER, DETAILS_VIEWER, REVIEWS_VIEWER, RATINGS_VIEWER]


def decide(policies, app, method="GET", path="/", principal=None, **kw):
    req = AuthzRequest(method, path, f"{app}:9080", 9080, kw.pop("headers", ()), principal, kw.pop("ip", "10.0.0.7"), **kw)
    return authorize(applicable(policies, "default", {"app": app, "version": "v1"}), req)


# ---------------------------------------------------------------- the Bookinfo task, step by step


@pytest.mark.parametrize("app", ["productpage", "details", "reviews", "ratings"])
def test_without_policies_everything_is_allowed(app):
    d = decide([], app, principal=sa("anyone"))
    assert d.allowed and d.policy is None


@pytest.mark.parametrize("app", ["productpage", "details", "reviews", "ratings"])
def test_allow_nothing_denies_every_workload(app):
    d = decide([ALLOW_NOTHING], app, principal=sa("bookinfo-productpage"))
    assert not d.allowed
    assert "default/allow-nothing" in d.reason


def test_productpage_viewer_allows_get_from_anyone_even_without_mtls():
    policies = [ALLOW_NOTHING, PRODUCTPAGE_VIEWER]
    d = decide(policies, "productpage", "GET", "/productpage", principal=None)
    assert d.allowed and d.policy == "default/productpage-viewer"
    assert not decide(policies, "productpage", "POST", "/productpage").allowed
    # productpage may be viewed, but its backends are still closed
    assert not decide(policies, "details", principal=sa("bookinfo-productpage")).allowed
    assert not decide(policies, "reviews", principal=sa("bookinfo-productpage")).allowed


def test_details_and_reviews_viewers_admit_only_productpage_with_get():
    for app in ("details", "reviews"):
        assert decide(ALL, app, "GET", "/details/0", principal=sa("bookinfo-productpage")).allowed
        assert not decide(ALL, app, "POST", "/details/0", principal=sa("bookinfo-productpage")).allowed
        assert not decide(ALL, app, "GET", "/details/0", principal=sa("bookinfo-reviews")).allowed
        assert not decide(ALL, app, "GET", "/details/0", principal=None).allowed  # plaintext: no principal
        # same service account name in another namespace is another principal
        assert not decide(ALL, app, "GET", "/", principal=sa("bookinfo-productpage", "prod")).allowed


def test_ratings_viewer_admits_only_reviews():
    assert decide(ALL, "ratings", "GET", "/ratings/0", principal=sa("bookinfo-reviews")).allowed
    d = decide(ALL, "ratings", "GET", "/ratings/0", principal=sa("bookinfo-productpage"))
    assert not d.allowed and "no ALLOW policy matched" in d.reason


def test_removing_allow_nothing_keeps_viewers_in_force():
    policies = [PRODUCTPAGE_VIEWER, DETAILS_VIEWER, REVIEWS_VIEWER, RATINGS_VIEWER]
    assert not decide(policies, "ratings", principal=sa("bookinfo-productpage")).allowed
    assert decide(policies, "productpage", principal=None).allowed


# ---------------------------------------------------------------- actions and precedence


def _p(action, *rules, selector=None):
    return AuthorizationPolicy(selector=selector, action=action, rules=tuple(rules))


MATCH_ALL = Rule()
POST_ONLY = Rule(to=(RuleTo(operation=Operation(methods=("POST",))),))


def test_deny_wins_over_allow():
    policies = [("default", "allow-all", _p("ALLOW", MATCH_ALL)), ("default", "no-post", _p("DENY", POST_ONLY))]
    assert decide(policies, "reviews", "GET").allowed
    d = decide(policies, "reviews", "POST")
    assert not d.allowed and d.policy == "default/no-post" and "DENY" in d.reason


def test_deny_without_allow_policies_denies_only_what_it_matches():
    policies = [("default", "no-post", _p("DENY", POST_ONLY))]
    assert decide(policies, "reviews", "GET").allowed
    assert not decide(policies, "reviews", "POST").allowed


def test_allow_all_and_deny_all_with_an_empty_rule():
    assert decide([("default", "allow-all", _p("ALLOW", MATCH_ALL))], "reviews", "DELETE").allowed
    assert not decide([("default", "deny-all", _p("DENY", MATCH_ALL))], "reviews").allowed


def test_rules_empty_list_is_allow_nothing_and_deny_without_rules_denies_nothing():
    assert not decide([("default", "a", AuthorizationPolicy(action="ALLOW", rules=()))], "reviews").allowed
    assert decide([("default", "d", AuthorizationPolicy(action="DENY"))], "reviews").allowed


def test_audit_marks_but_never_decides():
    policies = [("default", "audit-posts", _p("AUDIT", POST_ONLY))]
    d = decide(policies, "reviews", "POST")
    assert d.allowed and d.audit == ("default/audit-posts",)
    assert decide(policies, "reviews", "GET").audit == ()


def test_custom_policies_name_their_provider_when_they_match_and_stay_out_of_authorize():
    # Istio's ext-authz task: CUSTOM for paths ["/headers"] only
    pol = AuthorizationPolicy(action="CUSTOM", rules=(_op(paths=("/headers",)),), provider=FrozenDict(name="sample-ext-authz-http"))
    policies = applicable([("default", "ext-authz", pol)], "default", {"app": "httpbin"})
    req = lambda path: AuthzRequest("GET", path, "httpbin:8000", 8000)  # noqa: E731
    assert custom_check(policies, req("/headers")) == ("sample-ext-authz-http", "default/ext-authz")
    assert custom_check(policies, req("/ip")) is None
    assert authorize(policies, req("/headers")).allowed  # the authorizer decides, not authorize()


def test_selector_and_namespace_scoping():
    assert selector_matches(None, {"app": "x"})
    assert selector_matches(sel(), {"app": "x"})
    assert selector_matches(sel(app="reviews"), {"app": "reviews", "version": "v2"})
    assert not selector_matches(sel(app="reviews", version="v1"), {"app": "reviews", "version": "v2"})
    policies = [
        ("istio-system", "mesh-deny", _p("DENY", POST_ONLY)),
        ("prod", "other-ns", _p("DENY", MATCH_ALL)),
        ("default", "ratings-only", _p("DENY", MATCH_ALL, selector=sel(app="ratings"))),
    ]
    names = [n for n, _ in applicable(policies, "default", {"app": "reviews"})]
    assert names == ["istio-system/mesh-deny"]


# ---------------------------------------------------------------- field semantics


def _allow(rule):
    return [("default", "p", _p("ALLOW", rule))]


def _src(**kw):
    return Rule(from_=(RuleFrom(source=Source(**kw)),))


def _op(**kw):
    return Rule(to=(RuleTo(operation=Operation(**kw)),))


def test_principal_wildcards():
    rule = _src(principals=("cluster.local/ns/default/sa/bookinfo-*",))
    assert decide(_allow(rule), "r", principal=sa("bookinfo-reviews")).allowed
    assert not decide(_allow(rule), "r", principal=sa("other")).allowed
    suffix = _src(principals=("*/sa/admin",))
    assert decide(_allow(suffix), "r", principal=sa("admin", "ops")).allowed
    anyone = _src(principals=("*",))  # any authenticated peer
    assert decide(_allow(anyone), "r", principal=sa("x")).allowed
    assert not decide(_allow(anyone), "r", principal=None).allowed


def test_not_principals_and_namespaces_from_the_principal():
    rule = _src(namespaces=("default",), not_principals=("cluster.local/ns/default/sa/untrusted",))
    assert decide(_allow(rule), "r", principal=sa("reviews")).allowed
    assert not decide(_allow(rule), "r", principal=sa("untrusted")).allowed
    assert not decide(_allow(rule), "r", principal=sa("reviews", "prod")).allowed
    assert not decide(_allow(rule), "r", principal=None).allowed  # no mTLS: no namespace


def test_fields_within_a_source_are_anded_and_sources_are_ored():
    both = _src(namespaces=("default",), ip_blocks=("10.0.0.0/8",))
    assert decide(_allow(both), "r", principal=sa("a"), ip="10.1.2.3").allowed
    assert not decide(_allow(both), "r", principal=sa("a"), ip="192.168.1.1").allowed
    either = Rule(from_=(RuleFrom(Source(namespaces=("prod",))), RuleFrom(Source(ip_blocks=("192.168.0.0/16",)))))
    assert decide(_allow(either), "r", principal=sa("a"), ip="192.168.1.1").allowed
    assert not decide(_allow(either), "r", principal=sa("a"), ip="10.0.0.1").allowed


def test_ip_blocks_single_address_and_not_form_and_remote_ip():
    assert decide(_allow(_src(ip_blocks=("127.0.0.1",))), "r", ip="127.0.0.1").allowed
    assert not decide(_allow(_src(not_ip_blocks=("127.0.0.0/8",))), "r", ip="127.0.0.1").allowed
    remote = _src(remote_ip_blocks=("203.0.113.0/24",))
    assert decide(_allow(remote), "r", ip="10.0.0.1", remote_ip="203.0.113.9").allowed
    assert not decide(_allow(remote), "r", ip="10.0.0.1").allowed  # remote defaults to the peer
    assert decide(_allow(_src(ip_blocks=("::1",))), "r", ip="::1").allowed


def test_paths_exact_prefix_suffix_template_and_query_ignored():
    rule = _op(paths=("/api/v1/products", "/static/*", "*.css", "/users/{*}/profile", "/files/{**}"))
    ok = ["/api/v1/products?x=1", "/static/a/b.js", "/x/y.css", "/users/bob/profile", "/files/a/b/c"]
    for path in ok:
        assert decide(_allow(rule), "r", path=path).allowed, path
    for path in ["/api/v1/products/1", "/users/a/b/profile", "/static", "/api"]:
        assert not decide(_allow(rule), "r", path=path).allowed, path


def test_dot_segments_cannot_sneak_past_a_deny():
    policies = [("default", "no-admin", _p("DENY", _op(paths=("/admin*",))))]
    assert not decide(policies, "r", path="/public/../admin/users").allowed
    assert not decide(policies, "r", path="/./admin").allowed
    assert normalize_path("/a/./b/../c?q=/admin") == "/a/c"


def test_not_paths_methods_hosts_ports():
    rule = _op(not_paths=("/private*",), methods=("GET", "HEAD"), hosts=("Reviews*",), ports=("9080",))
    assert decide(_allow(rule), "reviews", "HEAD", "/public").allowed
    assert not decide(_allow(rule), "reviews", "GET", "/private/x").allowed
    assert not decide(_allow(rule), "reviews", "PUT", "/public").allowed
    assert not decide(_allow(rule), "ratings", "GET", "/public").allowed
    assert not decide(_allow(_op(ports=("8080",))), "reviews").allowed
    assert not decide(_allow(_op(not_methods=("GET",))), "reviews").allowed


def test_from_to_and_when_are_anded():
    rule = Rule(
        from_=(RuleFrom(Source(principals=("cluster.local/ns/default/sa/bookinfo-productpage",))),),
        to=(RuleTo(Operation(methods=("GET",))),),
        when=(Condition(key="request.headers[version]", values=("v1", "v2")),),
    )
    pp = sa("bookinfo-productpage")
    assert decide(_allow(rule), "r", "GET", principal=pp, headers=[("version", "v2")]).allowed
    assert not decide(_allow(rule), "r", "GET", principal=pp, headers=[("version", "v3")]).allowed
    assert not decide(_allow(rule), "r", "GET", principal=pp).allowed
    assert not decide(_allow(rule), "r", "POST", principal=pp, headers=[("version", "v1")]).allowed
    assert not decide(_allow(rule), "r", "GET", principal=sa("x"), headers=[("version", "v1")]).allowed


def test_when_conditions():
    def allowed(cond, **kw):
        return decide(_allow(Rule(when=(cond,))), "r", **kw).allowed

    assert allowed(Condition("request.headers[X-Token]", ("abc*",)), headers=[("x-token", "abcdef")])
    assert allowed(Condition("request.headers[x-debug]", not_values=("1",)))  # absent header
    assert not allowed(Condition("request.headers[x-debug]", not_values=("1",)), headers=[("x-debug", "1")])
    assert allowed(Condition("source.ip", ("10.0.0.0/24",)), ip="10.0.0.9")
    assert allowed(Condition("source.namespace", ("default",)), principal=sa("a"))
    assert not allowed(Condition("source.namespace", ("default",)), principal=sa("a", "prod"))
    assert allowed(Condition("source.principal", ("cluster.local/ns/default/sa/a",)), principal=sa("a"))
    assert allowed(Condition("destination.port", ("9080",)))
    assert not allowed(Condition("destination.port", ("8080",)))
    assert allowed(Condition("remote.ip", ("203.0.113.1",)), remote_ip="203.0.113.1")


def _user(sub="testing@secure.istio.io", **claims):
    iss = "testing@secure.istio.io"
    return RequestAuth(principal=f"{iss}/{sub}", issuer=iss, claims={"iss": iss, "sub": sub, **claims},
                       audiences=tuple(claims.get("aud", ())), presenter=claims.get("azp", ""))


def test_request_principals_need_a_verified_jwt():
    # Istio's "authorization with JWT" task: requestPrincipals iss/sub
    rule = _src(request_principals=("testing@secure.istio.io/testing@secure.istio.io",))
    assert decide(_allow(rule), "r", auth=_user()).allowed
    assert not decide(_allow(rule), "r", auth=_user(sub="someone-else")).allowed
    assert not decide(_allow(rule), "r").allowed  # no token: 403
    anyone = _src(request_principals=("*",))
    assert decide(_allow(anyone), "r", auth=_user()).allowed
    assert not decide(_allow(anyone), "r").allowed
    # Istio's "require a token" DENY: notRequestPrincipals ["*"] denies requests without one
    deny = [("default", "require-jwt", _p("DENY", _src(not_request_principals=("*",))))]
    assert not decide(deny, "r").allowed
    assert decide(deny, "r", auth=_user()).allowed
    prefix = _src(request_principals=("testing@secure.istio.io/*",))
    assert decide(_allow(prefix), "r", auth=_user(sub="x")).allowed


def test_request_auth_claims_and_other_jwt_attributes():
    def allowed(cond, **kw):
        return decide(_allow(Rule(when=(cond,))), "r", **kw).allowed

    groups = Condition("request.auth.claims[groups]", ("group1",))
    assert allowed(groups, auth=_user(groups=["group1", "group2"]))
    assert not allowed(groups, auth=_user(groups=["group2"]))
    assert not allowed(groups, auth=_user())  # claim absent
    assert not allowed(groups)  # no token
    assert allowed(Condition("request.auth.claims[groups]", not_values=("admins",)), auth=_user(groups=["g"]))
    nested = Condition("request.auth.claims[nested][key1]", ("value*",))
    assert allowed(nested, auth=_user(nested={"key1": "value1"}))
    assert not allowed(nested, auth=_user(nested={"key2": "value1"}))
    assert allowed(Condition("request.auth.claims[admin]", ("true",)), auth=_user(admin=True))
    assert allowed(Condition("request.auth.audiences", ("bookinfo.com",)), auth=_user(aud=["x", "bookinfo.com"]))
    assert not allowed(Condition("request.auth.audiences", ("bookinfo.com",)), auth=_user(aud=["x"]))
    assert allowed(Condition("request.auth.presenter", ("app-*",)), auth=_user(azp="app-1"))
    assert allowed(Condition("request.auth.principal", ("testing@secure.istio.io/*",)), auth=_user())
    assert not allowed(Condition("request.auth.principal", ("*",)))


def test_unknown_attributes_never_open_access():
    cond = Rule(when=(Condition("experimental.envoy.filters.network.mysql_proxy[db.table]", ("x",)),))
    assert not decide(_allow(cond), "r", auth=_user()).allowed
    assert not decide([("default", "d", _p("DENY", cond))], "r").allowed
    problems = validate_policy(_p("ALLOW", cond))
    assert problems and "does not know" in problems[0] and "never matches" in problems[0]
    assert validate_policy(_p("ALLOW", Rule(when=(Condition("request.auth.claims[a][b]", ("x",)),)))) == []


def test_validate_policy_names_bad_values():
    pol = _p(
        "ALLOW",
        Rule(
            from_=(RuleFrom(Source(ip_blocks=("10.0.0.300/8",))),),
            to=(RuleTo(Operation(ports=("http",), paths=("/a/{x}",))),),
            when=(Condition("source.service", ("x",)),),
        ),
    )
    text = "\n".join(validate_policy(pol))
    assert "10.0.0.300/8" in text and "'http' is not a number" in text
    assert "/a/{x}" in text and "source.service" in text
    assert validate_policy(viewer("details", ("cluster.local/ns/default/sa/bookinfo-productpage",))) == []
    assert "not one of" in validate_policy(AuthorizationPolicy(action="ALLOWW"))[0]


def test_connection_sni_matches_the_server_name_the_client_sent():
    # Istio's string match on connection.sni: exact, prefix*, *suffix, * (present)
    def allowed(cond, **kw):
        return decide(_allow(Rule(when=(cond,))), "r", **kw).allowed

    assert allowed(Condition("connection.sni", ("a.example.com",)), sni="a.example.com")
    assert not allowed(Condition("connection.sni", ("a.example.com",)), sni="b.example.com")
    assert allowed(Condition("connection.sni", ("a.*",)), sni="a.example.com")
    assert not allowed(Condition("connection.sni", ("a.*",)), sni="b.example.com")
    assert allowed(Condition("connection.sni", ("*.example.com",)), sni="b.example.com")
    assert not allowed(Condition("connection.sni", ("*.example.com",)), sni="b.example.org")
    assert allowed(Condition("connection.sni", ("*",)), sni="x")
    assert not allowed(Condition("connection.sni", ("*",)))  # plaintext: no SNI
    assert not allowed(Condition("connection.sni", ("a.example.com",)))
    assert not allowed(Condition("connection.sni", not_values=("b.*",)), sni="b.example.com")
    assert allowed(Condition("connection.sni", not_values=("b.*",)), sni="a.example.com")
    # no longer refused by route validate
    assert validate_policy(_p("ALLOW", Rule(when=(Condition("connection.sni", ("a.example.com",)),)))) == []
