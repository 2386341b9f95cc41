"""Delegate VirtualServices: a root VirtualService's HTTP route with ``delegate``
hands the requests it matches to the HTTP routes of another VirtualService, one
without hosts (its owner may be another team, in another namespace).

Pure: resources in, resources out. Istio's rules (VirtualService reference,
``HTTPRoute.delegate`` and ``Delegate``), as this module carries them out:

1. One level only: a delegate's own ``delegate`` routes are dropped (validate
   refuses them).
2. The root route is replaced by the delegate's routes, in their order. Each
   delegate route's matches are merged with the root route's: every delegate
   match with every root match, the delegate's conditions narrowing the root's
   (a delegate match must be a subset of a root match). A pair that conflicts
   is dropped; a delegate route left with no match at all does not apply. No
   match on either side: the other side's matches as they are.
3. Conditions of a pair: uri, scheme, method, authority: only one side sets it,
   or both, the delegate's inside the root's (root exact: the same exact; root
   prefix: a longer prefix or an exact under it); a regex on either side
   conflicts with any condition on the other. headers, withoutHeaders,
   queryParams: the same per key; port, sourceNamespace: equal when both are
   set; sourceLabels: equal values for the keys both name; gateways: the
   delegate's among the root's; ignoreUriCase: the same on both.
4. Route settings the delegate route leaves unset come from the root route:
   rewrite, timeout, retries, fault, mirror (and its percentages), mirrors,
   corsPolicy, headers. Names join as ``root-delegate``.
5. A missing delegate VirtualService: the root route is dropped (validate warns).
6. Destination hosts written short in a delegate are of the delegate's namespace.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

from ..model.base import FrozenDict
from ..model.istio import Destination, HTTPMatchRequest, HTTPRoute, Resource, StringMatch, VirtualService
from ..model.proxyconfig import fqdn

__all__ = ["expand_delegates", "merge_matches", "merge_route"]


def _sm_conflict(root: StringMatch | None, leaf: StringMatch | None) -> bool:
    if root is None or leaf is None:
        return False
    if root.regex is not None or leaf.regex is not None:
        return True  # a regex cannot be narrowed, nor narrow, in a way meshctl could check
    if root.exact is not None:
        return leaf.exact != root.exact
    if root.prefix is not None:
        inner = leaf.prefix if leaf.prefix is not None else leaf.exact
        return inner is None or not inner.startswith(root.prefix)
    return True


def _map_conflict(root: Mapping[str, StringMatch], leaf: Mapping[str, StringMatch]) -> bool:
    return any(_sm_conflict(root.get(k), v) for k, v in leaf.items())


def _conflicts(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> bool:
    for name in ("uri", "scheme", "method", "authority"):
        if _sm_conflict(getattr(root, name), getattr(leaf, name)):
            return True
    if _map_conflict(root.headers, leaf.headers) or _map_conflict(root.without_headers, leaf.without_headers):
        return True
    if _map_conflict(root.query_params, leaf.query_params):
        return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    if root.port and leaf.port and root.port != leaf.port:
        return True
    if root.source_namespace and leaf.source_namespace and root.source_namespace != leaf.source_namespace:
        return True
    if any(k in root.source_labels and root.source_labels[k] != v for k, v in leaf.source_labels.items()):
        return True
    if root.gateways and leaf.gateways and not set(leaf.gateways) <= set(root.gateways):
        return True
    return False


def _join(a: str | None, b: str | None) -> str | None:
    if a and b:
        return f"{a}-{b}"
    return b or a


def _merge_match(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> HTTPMatchRequest:
    return replace(
        leaf,
        name=_join(root.name, leaf.name),
        uri=leaf.uri or root.uri,
        scheme=leaf.scheme or root.scheme,
        method=leaf.method or root.method,
        authority=leaf.authority or root.authority,
        headers=FrozenDict({**root.headers, **leaf.headers}),
        without_headers=FrozenDict({**root.without_headers, **leaf.without_headers}),
        query_params=FrozenDict({**root.query_params, **leaf.query_params}),
        port=leaf.port or root.port,
        source_labels=FrozenDict({**root.source_labels, **leaf.source_labels}),
        gateways=leaf.gateways or root.gateways,
        source_namespace=leaf.source_namespace or root.source_namespace,
    )


def merge_matches(root: Sequence[HTTPMatchRequest], leaf: Sequence[HTTPMatchRequest]
                  ) -> tuple[HTTPMatchRequest, ...] | None:
    """The merged matches of a delegate route under a root route; None: every pair conflicts."""
    if not root:
        return tuple(leaf)
    if not leaf:
        return tuple(root)
    out = tuple(_merge_match(r, m) for m in leaf for r in root if not _conflicts(r, m))
    return out or None


def merge_route(root: HTTPRoute, leaf: HTTPRoute) -> HTTPRoute | None:
    """A delegate's route as it applies under the root route (rule 2 and 4), or None."""
    matches = merge_matches(root.match, leaf.match)
    if matches is None:
        return None
    return replace(
        leaf,
        name=_join(root.name, leaf.name),
        match=matches,
        rewrite=leaf.rewrite or root.rewrite,
        timeout=leaf.timeout if leaf.timeout is not None else root.timeout,
        retries=leaf.retries or root.retries,
        fault=leaf.fault or root.fault,
        mirror=leaf.mirror or root.mirror,
        mirror_percentage=leaf.mirror_percentage or root.mirror_percentage,
        mirror_percent=leaf.mirror_percent if leaf.mirror_percent is not None else root.mirror_percent,
        mirrors=leaf.mirrors or root.mirrors,
        cors_policy=leaf.cors_policy or root.cors_policy,
        headers=leaf.headers or root.headers,
    )


def _qualify(d: Destination, ns: str, known: Mapping[str, object]) -> Destination:
    """A short host of a delegate (``reviews``, ``reviews.nsB``) in the delegate's namespace."""
    if d.host in known:
        return d
    if "." not in d.host:
        return replace(d, host=fqdn(d.host, ns))
    if d.host.count(".") == 1:
        name, space = d.host.split(".")
        return replace(d, host=fqdn(name, space))
    return d


def _in_namespace(route: HTTPRoute, ns: str, known: Mapping[str, object]) -> HTTPRoute:
    return replace(
        route,
        route=tuple(replace(rd, destination=_qualify(rd.destination, ns, known)) for rd in route.route),
        mirror=_qualify(route.mirror, ns, known) if route.mirror is not None else None,
        mirrors=tuple(replace(m, destination=_qualify(m.destination, ns, known)) for m in route.mirrors),
    )


def expand_delegates(resources: Sequence[Resource], known_hosts: Mapping[str, object] = {}) -> list[Resource]:
    """The resources with each root VirtualService's delegate routes replaced by the
    merged routes of its delegates. ``known_hosts``: hosts written as they are (a
    ServiceEntry's ``api.example``), left alone when a delegate names them."""
    by_key = {(r.namespace, r.name): r for r in resources
              if isinstance(r.spec, VirtualService) and not r.spec.hosts}
    out: list[Resource] = []
    for r in resources:
        vs = r.spec
        if not isinstance(vs, VirtualService) or not vs.hosts or not any(h.delegate for h in vs.http):
            out.append(r)
            continue
        routes: list[HTTPRoute] = []
        for h in vs.http:
            if h.delegate is None:
                routes.append(h)
                continue
            ns = h.delegate.namespace or r.namespace
            child = by_key.get((ns, h.delegate.name))
            if child is None:
                continue  # rule 5
            for leaf in child.spec.http:  # type: ignore[attr-defined]
                if leaf.delegate is not None:
                    continue  # rule 1
                if ns != r.namespace:
                    leaf = _in_namespace(leaf, ns, known_hosts)
                merged = merge_route(replace(h, delegate=None), leaf)
                if merged is not None:
                    routes.append(merged)
        out.append(replace(r, spec=replace(vs, http=tuple(routes))))
    return out

