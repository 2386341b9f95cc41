"""Building a ``Router`` (core/route.py) from a ``RouteTable``: once per config.

``build_router(table, settings)`` does all the work ``Router.decide`` should not do
per request (the rules it carries out are written at the top of core/route.py):
domains sorted into exact, suffix-wildcard, prefix-wildcard and default maps;
StringMatches turned into conditions (regexes compiled with RE2); destination
weights resolved into running sums; cluster names; retry policies; direct
responses encoded; rewrites checked. What cannot be served is a
``RouteConfigError`` naming the virtual host, the route and the field:

  - a StringMatch that sets more than one of exact/prefix/regex, or a regex RE2
    rejects;
  - a route that sets more than one of route, redirect and directResponse, or
    none of them;
  - a redirectCode that is not 301, 302, 303, 307 or 308; a directResponse
    status outside 200-599, a body with both string and bytes, bytes that are
    not base64;
  - negative destination weights, or weights that sum to 0; a destination with
    no host, or with no port when its virtual host carries none;
  - request header operations on "host" or a pseudo-header (use
    rewrite.authority);
  - rewrite.uri together with uriRegexRewrite; an invalid uriRegexRewrite
    pattern or a rewrite that refers to a group the pattern does not have;
  - a bad retry policy (core/retry.py);
  - a domain with a wildcard in the middle.
A domain that two virtual hosts list belongs to the first; the second listing
is reported in ``Router.warnings``.

Interpreted on purpose: setup.py compiles core/route.py, whose code a sidecar
runs per request, and leaves this module out, so the compiled library every
sidecar keeps resident does not carry code that runs once per config.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Any, Callable, Final

from ..model.base import HeaderList
from ..model.istio import HeaderOperations, HTTPMatchRequest, HTTPRoute, StringMatch
from ..model.proxyconfig import RouteTable, Settings, VirtualHost, cluster_name
from .regex import RegexError, compile_regex
from .retry import RetryConfigError
from .retrypolicy import retry_policy
from .route import (
    DirectResponse,
    RouteConfigError,
    Router,
    _always,
    _any_value,
    _claim_getter,
    _compile_ops,
    _Cond,
    _Dest,
    _equals,
    _full_match,
    _gateway_in,
    _get_gateway,
    _get_lower_path,
    _get_path,
    _getter_attr,
    _header_getter,
    _labels_include,
    _Match,
    _Ops,
    _param_getter,
    _Route,
    _same,
    _split_host_port,
    _starts_with,
    _VHost,
    apply_header_ops,
)

__all__ = ["build_router", "CLAIM_HEADER"]

CLAIM_HEADER: Final = "@request.auth.claims."  # Istio's JWT claim based routing: headers["@request.auth.claims.groups"]
_REDIRECT_CODES: Final = frozenset({301, 302, 303, 307, 308})


def build_router(table: RouteTable, settings: Settings) -> Router:
    """``table`` compiled for ``Router.decide``; raises RouteConfigError."""
    vhosts = tuple(_build_vhost(vh, settings) for vh in table.virtual_hosts)
    warnings: list[str] = []
    exact: dict[str, _VHost] = {}
    suffix: list[tuple[str, _VHost]] = []
    prefix: list[tuple[str, _VHost]] = []
    default: _VHost | None = None
    seen: dict[str, str] = {}
    for cv in vhosts:
        for domain in cv.vh.domains:
            d = domain.lower()
            if d in seen:
                warnings.append(
                    f"domain {domain!r} of virtual host {cv.vh.name!r} is already served by {seen[d]!r}; ignored"
                )
                continue
            seen[d] = cv.vh.name
            if d == "*":
                default = cv
            elif d.startswith("*"):
                suffix.append((d[1:], cv))
            elif d.endswith("*"):
                prefix.append((d[:-1], cv))
            elif "*" in d:
                raise RouteConfigError(
                    f"virtual host {cv.vh.name!r}: domain {domain!r} has a wildcard in the middle; "
                    "only a leading or trailing '*' is allowed"
                )
            else:
                exact[d] = cv
    subnets = tuple((ipaddress.ip_network(n, strict=False), cv.vh.port, cv)
                    for cv in vhosts for n in cv.vh.subnets)
    return Router(
        table,
        settings,
        vhosts=vhosts,
        exact=exact,
        # longest wildcard first (stable: earlier virtual hosts win ties)
        suffix=tuple(sorted(suffix, key=lambda t: -len(t[0]))),
        prefix=tuple(sorted(prefix, key=lambda t: -len(t[0]))),
        default=default,
        subnets=subnets,
        warnings=warnings,
    )


def _build_vhost(vh: VirtualHost, settings: Settings) -> _VHost:
    return _VHost(vh, tuple(_build_route(r, i, vh, settings) for i, r in enumerate(vh.routes)))


# ---------------------------------------------------------------- match conditions


def _string_test(sm: StringMatch, where: str, *, ignore_case: bool = False) -> tuple[Callable[[str], bool], str]:
    given = [k for k in ("exact", "prefix", "regex") if getattr(sm, k) is not None]
    if len(given) > 1:
        raise RouteConfigError(f"{where}: a StringMatch sets only one of exact/prefix/regex, got {', '.join(given)}")
    if sm.exact is not None:
        if ignore_case:
            return _equals(sm.exact.lower()), f"equal {sm.exact!r} ignoring case"
        return _equals(sm.exact), f"equal {sm.exact!r}"
    if sm.prefix is not None:
        if ignore_case:
            return _starts_with(sm.prefix.lower()), f"start with {sm.prefix!r} ignoring case"
        return _starts_with(sm.prefix), f"start with {sm.prefix!r}"
    if sm.regex is not None:
        try:
            pat = compile_regex(sm.regex)
        except RegexError as e:
            raise RouteConfigError(f"{where}: {e}") from None
        return _full_match(pat), f"fully match regex {sm.regex!r}"
    return _always, "be present"


def _compile_match(m: HTTPMatchRequest, index: int, where: str) -> _Match:
    conds: list[_Cond] = []
    rewrite_kind, prefix_len = "prefix", 1  # Istio: no uri match is prefix "/"
    if m.uri is not None:
        w = f"{where}: uri"
        ic = m.ignore_uri_case and m.uri.regex is None
        test, expect = _string_test(m.uri, w, ignore_case=ic)
        conds.append(_Cond("uri path", expect, _get_lower_path if ic else _get_path, test))
        if m.uri.prefix is not None:
            rewrite_kind, prefix_len = "prefix", len(m.uri.prefix)
        elif m.uri.exact is not None or m.uri.regex is not None:
            rewrite_kind, prefix_len = "full", 0
    for field in ("method", "scheme", "authority"):
        sm = getattr(m, field)
        if sm is not None:
            test, expect = _string_test(sm, f"{where}: {field}")
            conds.append(_Cond(field, expect, _getter_attr(field), test))
    for name, sm in m.headers.items():
        lname = name.lower()
        test, expect = _string_test(sm, f"{where}: headers[{name}]")
        if name.startswith(CLAIM_HEADER):
            claim = name[len(CLAIM_HEADER):]
            conds.append(_Cond(f"JWT claim {claim!r}", expect, _claim_getter(claim), _any_value(test)))
            continue
        conds.append(_Cond(f"header {lname!r}", expect, _header_getter(lname), test))
    for name, sm in m.without_headers.items():
        lname = name.lower()
        test, expect = _string_test(sm, f"{where}: withoutHeaders[{name}]")
        if name.startswith(CLAIM_HEADER):
            claim = name[len(CLAIM_HEADER):]
            conds.append(_Cond(f"JWT claim {claim!r}", expect, _claim_getter(claim), _any_value(test), negate=True))
            continue
        conds.append(_Cond(f"header {lname!r}", expect, _header_getter(lname), test, negate=True))
    for name, sm in m.query_params.items():
        if sm.prefix is not None and sm.exact is None and sm.regex is None:
            # Istio: prefix is not supported for query params; Envoy gets no
            # value matcher and checks presence only.
            test, expect = _always, "be present (prefix is not supported for query params)"
        else:
            test, expect = _string_test(sm, f"{where}: queryParams[{name}]")
        conds.append(_Cond(f"query param {name!r}", expect, _param_getter(name), test))
    if m.port is not None:
        conds.append(_Cond("port", f"equal {m.port}", _getter_attr("port"), _same(m.port)))
    if m.source_labels:
        want = dict(m.source_labels)
        shown = ",".join(f"{k}={v}" for k, v in want.items())
        conds.append(_Cond("source labels", f"include {shown}", _getter_attr("source_labels"), _labels_include(want)))
    if m.source_namespace is not None:
        ns = m.source_namespace
        conds.append(_Cond("source namespace", f"equal {ns!r}", _getter_attr("source_namespace"), _same(ns)))
    if m.gateways:
        full = frozenset(m.gateways)
        short = frozenset(g for g in m.gateways if "/" not in g)
        conds.append(_Cond("gateway", f"be one of {', '.join(m.gateways)}", _get_gateway, _gateway_in(full, short)))
    return _Match(index, tuple(conds), rewrite_kind, prefix_len)


# ---------------------------------------------------------------- routes


def _port_of_vhost(name: str) -> int | None:
    _, port = _split_host_port(name)
    return port


def _to_re_template(rewrite: str) -> str:
    """RE2 substitutions write groups as \\1 and the whole match as \\0;
    Python's re.sub understands \\g<0>, not \\0."""
    return re.sub(r"\\(\d)", r"\\g<\1>", rewrite)


def _check_request_ops(ops: _Ops | None, where: str) -> None:
    if ops is None:
        return
    for name in ops.drop | {k for k, _ in ops.append}:
        if name == "host" or name.startswith(":"):
            raise RouteConfigError(f"{where}: cannot change {name!r}; use rewrite.authority")


def _build_route(route: HTTPRoute, index: int, vh: VirtualHost, settings: Settings) -> _Route:
    label = f"route {index}" + (f" {route.name!r}" if route.name else "")
    where = f"virtual host {vh.name!r}, {label}"
    matches = tuple(
        _compile_match(m, i, f"{where}, match {i}" + (f" {m.name!r}" if m.name else ""))
        for i, m in enumerate(route.match)
    )
    req_ops = _compile_ops(route.headers.request if route.headers else None)
    resp_ops = route.headers.response if route.headers else None
    _check_request_ops(req_ops, f"{where}: headers.request")
    actions = [n for n, v in (("redirect", route.redirect), ("directResponse", route.direct_response)) if v]
    if route.route:
        actions.append("route")
    if len(actions) > 1:
        raise RouteConfigError(f"{where}: sets {' and '.join(actions)}; a route does exactly one of them")
    if route.redirect is not None:
        code = route.redirect.redirect_code or 301
        if code not in _REDIRECT_CODES:
            raise RouteConfigError(f"{where}: redirectCode {code} is not a redirect status {sorted(_REDIRECT_CODES)}")
        return _Route(index, route, label, matches, "redirect", redirect_status=code,
                      route_req_ops=req_ops, route_resp_ops=resp_ops)
    if route.direct_response is not None:
        return _Route(index, route, label, matches, "direct", direct=_compile_direct(route, index, resp_ops, where),
                      route_req_ops=req_ops, route_resp_ops=resp_ops)
    if not route.route:
        raise RouteConfigError(f"{where}: has no route, redirect or directResponse")
    dests = _destinations(route, vh, where)
    cum: list[int] = []
    total = 0
    for dest in dests:
        total += dest.weight
        cum.append(total)
    rewrite_uri, regex_rewrite, rewrite_authority = _rewrites(route, where)
    try:
        retry = retry_policy(route.retries, settings)
    except RetryConfigError as e:
        raise RouteConfigError(f"{where}: retries: {e}") from None
    return _Route(index, route, label, matches, "forward", dests=dests, cum=tuple(cum), total=total,
                  route_req_ops=req_ops, route_resp_ops=resp_ops, rewrite_uri=rewrite_uri,
                  regex_rewrite=regex_rewrite, rewrite_authority=rewrite_authority,
                  timeout=float(route.timeout) if route.timeout else None, retry=retry)


def _compile_direct(route: HTTPRoute, index: int, resp_ops: HeaderOperations | None, where: str) -> DirectResponse:
    dr = route.direct_response
    assert dr is not None
    if not 200 <= dr.status <= 599:
        raise RouteConfigError(f"{where}: directResponse.status {dr.status} is not an HTTP status (200-599)")
    body = b""
    if dr.body is not None:
        if dr.body.string is not None and dr.body.bytes is not None:
            raise RouteConfigError(f"{where}: directResponse.body sets both string and bytes")
        if dr.body.string is not None:
            body = dr.body.string.encode("utf-8")
        elif dr.body.bytes is not None:
            try:
                body = base64.b64decode(dr.body.bytes, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RouteConfigError(f"{where}: directResponse.body.bytes is not valid base64: {e}") from None
    headers: HeaderList = [("content-type", "text/plain")] if body else []
    headers = apply_header_ops(headers, resp_ops)
    return DirectResponse(status=dr.status, body=body, headers=headers, route_index=index)


def _destinations(route: HTTPRoute, vh: VirtualHost, where: str) -> tuple[_Dest, ...]:
    weights = [d.weight for d in route.route]
    if any(w is not None and w < 0 for w in weights):
        raise RouteConfigError(f"{where}: destination weights must not be negative, got {weights}")
    if all(w is None for w in weights):
        resolved = [100 // len(weights) or 1] * len(weights) if len(weights) > 1 else [100]
    else:
        resolved = [w or 0 for w in weights]
    if len(resolved) == 1 and resolved[0] == 0:
        resolved = [100]
    if sum(resolved) <= 0:
        raise RouteConfigError(f"{where}: destination weights {weights} sum to 0")
    vh_port = _port_of_vhost(vh.name)
    dests = []
    for i, (d, w) in enumerate(zip(route.route, resolved)):
        dw = f"{where}, destination {i}"
        if not d.destination.host:
            raise RouteConfigError(f"{dw}: destination.host is empty")
        port = d.destination.port.number if d.destination.port and d.destination.port.number else vh_port
        if port is None:
            raise RouteConfigError(
                f"{dw}: destination {d.destination.host!r} names no port and virtual host {vh.name!r} carries none"
            )
        req_ops = _compile_ops(d.headers.request if d.headers else None)
        _check_request_ops(req_ops, f"{dw}: headers.request")
        dests.append(
            _Dest(
                destination=d,
                cluster=cluster_name(d.destination.host, port, d.destination.subset),
                weight=w,
                request_ops=req_ops,
                response_ops=d.headers.response if d.headers else None,
            )
        )
    return tuple(dests)


def _rewrites(route: HTTPRoute, where: str) -> tuple[str | None, tuple[Any, str] | None, str | None]:
    """(rewrite.uri, (uriRegexRewrite's pattern, its re.sub template), rewrite.authority)."""
    rw = route.rewrite
    if rw is None:
        return None, None, None
    if rw.uri is not None and rw.uri_regex_rewrite is not None:
        raise RouteConfigError(f"{where}: rewrite sets both uri and uriRegexRewrite")
    regex_rewrite = None
    if rw.uri_regex_rewrite is not None:
        try:
            pat = compile_regex(rw.uri_regex_rewrite.match)
        except RegexError as e:
            raise RouteConfigError(
                f"{where}: rewrite.uriRegexRewrite.match {rw.uri_regex_rewrite.match!r} is not a valid regex: {e}"
            ) from None
        template = _to_re_template(rw.uri_regex_rewrite.rewrite)
        try:  # a bad group reference would otherwise fail on the first request
            re.compile("()" * pat.groups).sub(template, "")
        except (re.error, IndexError) as e:
            raise RouteConfigError(
                f"{where}: rewrite.uriRegexRewrite.rewrite {rw.uri_regex_rewrite.rewrite!r}: {e}"
            ) from None
        regex_rewrite = (pat, template)
    return rw.uri, regex_rewrite, rw.authority or None
