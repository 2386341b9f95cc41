"""Delegate VirtualServices: Istio's merge rules (pilot/delegate.py) and what
`route validate` says about delegation."""

from __future__ import annotations

from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import validate
from meshctl.model.base import Duration, FrozenDict
from meshctl.model.istio import Delegate, HTTPMatchRequest, HTTPRoute, StringMatch
from meshctl.pilot.delegate import expand_delegates, merge_matches, merge_route


def _m(**kw) -> HTTPMatchRequest:
    return HTTPMatchRequest(**kw)


def test_a_delegate_match_must_narrow_the_roots_uri():
    root = (_m(uri=StringMatch(prefix="/productpage")),)
    assert merge_matches(root, (_m(uri=StringMatch(prefix="/productpage/v1/")),)) == (
        _m(uri=StringMatch(prefix="/productpage/v1/")),)
    assert merge_matches(root, (_m(uri=StringMatch(exact="/productpage/x")),)) is not None
    assert merge_matches(root, (_m(uri=StringMatch(prefix="/reviews")),)) is None
    assert merge_matches((_m(uri=StringMatch(exact="/a")),), (_m(uri=StringMatch(prefix="/a")),)) is None
    assert merge_matches((_m(uri=StringMatch(regex="/a.*")),), (_m(uri=StringMatch(prefix="/a")),)) is None


def test_conditions_the_delegate_does_not_set_come_from_the_root_and_maps_merge():
    root = (_m(name="pp", uri=StringMatch(prefix="/p"), headers=FrozenDict(x=StringMatch(exact="1")), port=80),)
    leaf = (_m(name="v1", headers=FrozenDict(y=StringMatch(exact="2"))),)
    (merged,) = merge_matches(root, leaf)
    assert merged.uri == StringMatch(prefix="/p") and merged.port == 80 and merged.name == "pp-v1"
    assert dict(merged.headers) == {"x": StringMatch(exact="1"), "y": StringMatch(exact="2")}
    # the same header with another value conflicts; another port conflicts
    assert merge_matches(root, (_m(headers=FrozenDict(x=StringMatch(exact="9"))),)) is None
    assert merge_matches(root, (_m(port=81),)) is None


def test_every_delegate_match_is_tried_with_every_root_match_and_only_conflicts_drop():
    root = (_m(uri=StringMatch(prefix="/a")), _m(uri=StringMatch(prefix="/b")))
    leaf = (_m(uri=StringMatch(prefix="/a/1")), _m(uri=StringMatch(prefix="/b/2")), _m(uri=StringMatch(prefix="/c")))
    assert [m.uri.prefix for m in merge_matches(root, leaf)] == ["/a/1", "/b/2"]
    assert merge_matches((), leaf) == leaf and merge_matches(root, ()) == root


def test_route_settings_the_delegate_leaves_unset_come_from_the_root():
    root = HTTPRoute(name="root", match=(_m(uri=StringMatch(prefix="/p")),), timeout=Duration(3.0),
                     delegate=Delegate(name="child"))
    leaf = HTTPRoute(name="leaf", timeout=None)
    merged = merge_route(root, leaf)
    assert merged is not None and merged.timeout == Duration(3.0) and merged.name == "root-leaf"
    assert merge_route(root, HTTPRoute(timeout=Duration(1.0))).timeout == Duration(1.0)


ROOT = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /r}}]
    delegate: {name: child, namespace: team}
  - route: [{destination: {host: reviews, subset: v1}}]
"""
CHILD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: child, namespace: team}
spec:
  http:
  - route: [{destination: {host: reviews2}}]
"""


def test_a_delegates_short_hosts_are_of_its_namespace_and_the_roots_other_routes_stay():
    resources = load_resources_text(ROOT + "---\n" + CHILD, "d.yaml")
    out = expand_delegates(resources)
    root = next(r for r in out if r.name == "root")
    assert [h.route[0].destination.host for h in root.spec.http] == ["reviews2.team.svc.cluster.local", "reviews"]
    assert root.spec.http[0].match[0].uri == StringMatch(prefix="/r") and root.spec.http[0].delegate is None


def _errors(text: str) -> list[str]:
    return [str(f) for f in validate(load_resources_text(text, "d.yaml"))]


def test_validate_names_what_delegation_does_not_allow():
    assert not [e for e in _errors(ROOT + "---\n" + CHILD) if "error" in e]
    both = ROOT.replace("    delegate: {name: child, namespace: team}",
                        "    delegate: {name: child, namespace: team}\n    route: [{destination: {host: reviews}}]")
    assert any("spec.http[0].delegate: delegate cannot be set together with route" in e for e in _errors(both + "---\n" + CHILD))
    nested = CHILD + "  - match: [{uri: {prefix: /r/x}}]\n    delegate: {name: other}\n"
    assert any("spec.http[1].delegate: one level of delegation only" in e for e in _errors(ROOT + "---\n" + nested))
    gw = CHILD.replace("spec:\n", "spec:\n  gateways: [mesh]\n")
    assert any("spec.gateways: a delegate VirtualService (no hosts) applies on its root's gateways" in e
               for e in _errors(ROOT + "---\n" + gw))
    regex = ROOT.replace("{prefix: /r}", "{regex: /r.*}")
    assert any("spec.http[0].match[0].uri.regex: a regex match cannot be used with delegation" in e
               for e in _errors(regex + "---\n" + CHILD))
    assert any("error: spec.hosts: at least one host is required (a VirtualService without hosts is a delegate, "
               "and no root VirtualService delegates to team/child" in e for e in _errors(CHILD))
    assert any("delegate VirtualService team/child not found" in e for e in _errors(ROOT))
