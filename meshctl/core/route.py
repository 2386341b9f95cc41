"""Routing decisions: which rule a request matches and what to do with it.

Pure: no I/O, no clock, no global random. ``Router`` compiles a
``RouteTable`` once (regexes, domain maps, destination weights, clusters,
retry policies, static direct responses) and ``decide`` then does only
per-request work. The proxy carries out the ``Decision``;
``meshctl route explain`` calls ``Router.explain`` on the same compiled table.

Rules (Istio's VirtualService, as Envoy applies it):

Virtual host, by the request's authority (compared lower-case, port
included, as Envoy does; the model's domains already list "host" and
"host:port"):
  1. an exact domain;
  2. else the longest suffix wildcard ("*.example.com", "*-bar.example.com");
  3. else the longest prefix wildcard ("example.*");
  4. else "*";
  5. else 404 "no virtual host for <authority>".
  A domain listed by two virtual hosts belongs to the first (see
  ``Router.warnings``).

Routes, in order; the first that matches wins; none matching is 404.
  - An empty ``match`` list matches every request. The HTTPMatchRequests of
    a list are OR-ed; the conditions inside one are AND-ed.
  - StringMatch: exact, prefix, or regex (a FULL match, RE2 via core/regex.py);
    a StringMatch with none of them matches presence.
  - uri is matched against the path without the query string (or fragment);
    ``ignoreUriCase`` applies to exact and prefix, not to regex.
  - headers: names lower-case; repeated headers are matched as one value
    joined with "," (Envoy). withoutHeaders matches when the header is
    absent or its value does not match.
  - queryParams: exact and regex on the first value, undecoded (Envoy).
    Istio documents prefix as unsupported; Envoy then receives no value
    matcher, which checks presence only, and so does meshctl.
  - method, scheme, authority: StringMatch on the request's values.
  - port: the destination (listener/service) port.
  - sourceLabels: every listed label present with that value;
    sourceNamespace: equal.
  - gateways: the request arrived at one of them; a sidecar request (no
    gateway) is the reserved gateway "mesh". An entry without "/" also
    matches a gateway of that name in any namespace.

The matched route then does exactly one of:
  - redirect: status ``redirectCode`` (default 301) and a Location built from
    the request with uri / authority / port / scheme replaced; the query
    string is kept unless the new uri has one; a port equal to the scheme's
    default is left out; a scheme change drops the old scheme's default port.
  - directResponse: status and body (string, or base64 ``bytes``), with
    "content-type: text/plain" when there is a body, and the route's
    response header operations.
  - route: one destination picked by weight with the injected Random
    (a single destination without weight gets everything; unset weights are
    0 when others are set, equal when none is); the cluster is
    ``cluster_name(host, port, subset)``. Rewrites: ``rewrite.uri`` replaces
    the matched prefix for a prefix match and the whole path for an exact or
    regex match; a match without uri is Istio's prefix "/" (so "/v2" on
    "/foo" gives "/v2foo", as in Envoy). ``uriRegexRewrite`` substitutes every
    match in the path. The query string is kept. ``rewrite.authority``
    replaces the authority (and a Host header). Request header operations
    apply route level first, then destination level (the most specific wins);
    response operations are returned in the same order for the proxy.
    ``timeout`` 0 or unset means none; retries come from core.retry.

Header operations (``apply_header_ops``): remove, then set (replace every
value), then add (append another value). The Host header cannot be changed
this way (Envoy refuses too): use rewrite.authority.
"""

from __future__ import annotations

import ipaddress

import base64
import binascii
import random
import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable, Final, Mapping, Sequence

from ..dataclass_slots import DATACLASS_SLOTS
from .errors import CoreConfigError
from ..model.base import EMPTY, HeaderList
from ..model.istio import (
    HeaderOperations,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRoute,
    HTTPRouteDestination,
    StringMatch,
)
from ..model.proxyconfig import RouteTable, Settings, VirtualHost, cluster_name
from .regex import RegexError, compile_regex
from .retry import RetryConfigError, RetryPolicy, retry_policy

__all__ = [
    "RequestView",
    "Forward",
    "Redirect",
    "DirectResponse",
    "NoRoute",
    "Decision",
    "Router",
    "RouteConfigError",
    "apply_header_ops",
]


class RouteConfigError(CoreConfigError):
    """A route table that cannot be compiled; the message names the virtual
    host, the route and the field."""


# ---------------------------------------------------------------- decisions


# RequestView and Forward are made for every routed request, so they write their
# __init__ out (same parameters, order and defaults as the fields): under mypyc the one
# dataclass() generates stays interpreted Python, storing each field through
# object.__setattr__ (frozen). They are therefore not frozen dataclasses (a frozen one
# cannot assign its own fields); nothing changes them once made: a changed Forward is
# a new one (dataclasses.replace). Slots in the pure build only (meshctl/dataclass_slots.py).


@dataclass(**DATACLASS_SLOTS)
class RequestView:
    method: str
    scheme: str
    authority: str
    path: str  # path and ?query, origin-form
    headers: HeaderList
    port: int | None = None  # destination port (listener/service port)
    source_labels: Mapping[str, str] = EMPTY
    source_namespace: str | None = None
    gateway: str | None = None  # "namespace/name" of the gateway it arrived at; None: sidecar ("mesh")
    claims: Mapping[str, Any] | None = None  # the verified JWT's claims (RequestAuthentication), for @request.auth.claims

    def __init__(self, method: str, scheme: str, authority: str, path: str, headers: Sequence[tuple[str, str]],
                 port: int | None = None, source_labels: Mapping[str, str] = EMPTY,
                 source_namespace: str | None = None, gateway: str | None = None,
                 claims: Mapping[str, Any] | None = None) -> None:
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        # any sequence of pairs, as the generated __init__ took (compiled code checks types)
        self.headers = headers if type(headers) is list else list(headers)
        self.port = port
        self.source_labels = source_labels
        self.source_namespace = source_namespace
        self.gateway = gateway
        self.claims = claims


@dataclass(**DATACLASS_SLOTS)
class Forward:
    route: HTTPRoute
    route_index: int
    virtual_host: str
    destination: HTTPRouteDestination
    cluster: str  # cluster name to send to
    path: str  # after rewrite, with the query string
    authority: str  # after rewrite
    request_headers: HeaderList  # after route + destination header ops (req.headers itself when none)
    response_ops: tuple[HeaderOperations, ...]  # to apply to the response, in order
    timeout: float | None  # whole-request timeout, None = none
    retry: RetryPolicy
    fault: HTTPFaultInjection | None

    def __init__(self, route: HTTPRoute, route_index: int, virtual_host: str, destination: HTTPRouteDestination,
                 cluster: str, path: str, authority: str, request_headers: HeaderList,
                 response_ops: tuple[HeaderOperations, ...], timeout: float | None, retry: RetryPolicy,
                 fault: HTTPFaultInjection | None) -> None:
        self.route = route
        self.route_index = route_index
        self.virtual_host = virtual_host
        self.destination = destination
        self.cluster = cluster
        self.path = path
        self.authority = authority
        self.request_headers = request_headers
        self.response_ops = response_ops
        self.timeout = timeout
        self.retry = retry
        self.fault = fault


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int
    location: str
    route_index: int


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes
    headers: HeaderList
    route_index: int


@dataclass(frozen=True, slots=True)
class NoRoute:
    status: int
    reason: str


Decision = Forward | Redirect | DirectResponse | NoRoute


# ---------------------------------------------------------------- header operations


@dataclass(frozen=True, slots=True)
class _Ops:
    """HeaderOperations normalised once: names to drop, pairs to append."""

    drop: frozenset[str]
    append: tuple[tuple[str, str], ...]


def _compile_ops(ops: HeaderOperations | None) -> _Ops | None:
    if ops is None or not (ops.set or ops.add or ops.remove):
        return None
    drop = frozenset(n.lower() for n in ops.remove) | frozenset(n.lower() for n in ops.set)
    append = tuple((k.lower(), v) for k, v in ops.set.items()) + tuple((k.lower(), v) for k, v in ops.add.items())
    return _Ops(drop, append)


def _apply(headers: HeaderList, ops: _Ops) -> HeaderList:
    drop = ops.drop
    out = [kv for kv in headers if kv[0] not in drop] if drop else list(headers)
    out.extend(ops.append)
    return out


def apply_header_ops(headers: HeaderList, ops: HeaderOperations | None) -> HeaderList:
    """Remove, then set, then add. Returns a new list, or ``headers`` itself
    when ``ops`` changes nothing."""
    compiled = _compile_ops(ops)
    if compiled is None:
        return headers
    return _apply(headers, compiled)


# ---------------------------------------------------------------- per-request view


class _Req:
    """The request, with the parts matchers need parsed once, on first use."""

    __slots__ = ("view", "_path", "_lpath", "_query", "_hdrs", "_params")

    def __init__(self, view: RequestView) -> None:
        self.view = view
        self._path: str | None = None
        self._lpath: str | None = None
        self._query = ""
        self._hdrs: dict[str, str] | None = None
        self._params: dict[str, str] | None = None

    def _split(self) -> None:
        raw = self.view.path
        path, sep, query = raw.partition("?")
        if "#" in path:
            path = path.partition("#")[0]
        if "#" in query:
            query = query.partition("#")[0]
        self._path = path
        self._query = query

    @property
    def path(self) -> str:
        if self._path is None:
            self._split()
        return self._path  # type: ignore[return-value]

    @property
    def query(self) -> str:
        if self._path is None:
            self._split()
        return self._query

    @property
    def lower_path(self) -> str:
        if self._lpath is None:
            self._lpath = self.path.lower()
        return self._lpath

    def header(self, name: str) -> str | None:
        h = self._hdrs
        if h is None:
            h = {}
            for k, v in self.view.headers:
                old = h.get(k)
                h[k] = v if old is None else f"{old},{v}"
            self._hdrs = h
        return h.get(name)

    def param(self, name: str) -> str | None:
        p = self._params
        if p is None:
            p = {}
            q = self.query
            if q:
                for part in q.split("&"):
                    if part:
                        k, _, v = part.partition("=")
                        p.setdefault(k, v)
            self._params = p
        return p.get(name)


# ---------------------------------------------------------------- match conditions


_regex: Final = compile_regex  # RE2 (core/regex.py): linear time, whatever the pattern


class _Cond:
    """One condition of an HTTPMatchRequest."""

    __slots__ = ("label", "expect", "get", "test", "negate")

    def __init__(
        self,
        label: str,
        expect: str,
        get: Callable[[_Req], Any],
        test: Callable[[Any], bool],
        negate: bool = False,
    ) -> None:
        self.label = label  # "header 'end-user'"
        self.expect = expect  # "equals 'jason'"
        self.get = get
        self.test = test
        self.negate = negate

    def ok(self, r: _Req) -> bool:
        v = self.get(r)
        if self.negate:
            return v is None or not self.test(v)
        return v is not None and self.test(v)

    def why_not(self, r: _Req) -> str:
        v = self.get(r)
        if self.negate:
            return f"{self.label} is {v!r} and must not {self.expect} (withoutHeaders)"
        if v is None:
            return f"{self.label} is absent (wanted: {self.expect})"
        return f"{self.label} is {v!r}, which does not {self.expect}"


def _always(_: Any) -> bool:
    return True


def _string_test(sm: StringMatch, where: str, *, ignore_case: bool = False) -> tuple[Callable[[str], bool], str]:
    given = [k for k in ("exact", "prefix", "regex") if getattr(sm, k) is not None]
    if len(given) > 1:
        raise RouteConfigError(f"{where}: a StringMatch sets only one of exact/prefix/regex, got {', '.join(given)}")
    if sm.exact is not None:
        if ignore_case:
            low = sm.exact.lower()
            return (lambda v: v == low), f"equal {sm.exact!r} ignoring case"
        exact = sm.exact
        return (lambda v: v == exact), f"equal {exact!r}"
    if sm.prefix is not None:
        if ignore_case:
            lowp = sm.prefix.lower()
            return (lambda v: v.startswith(lowp)), f"start with {sm.prefix!r} ignoring case"
        prefix = sm.prefix
        return (lambda v: v.startswith(prefix)), f"start with {prefix!r}"
    if sm.regex is not None:
        try:
            pat = _regex(sm.regex)
        except RegexError as e:
            raise RouteConfigError(f"{where}: {e}") from None
        full = pat.fullmatch
        return (lambda v: full(v) is not None), f"fully match regex {sm.regex!r}"
    return _always, "be present"


def _getter_attr(name: str) -> Callable[[_Req], Any]:
    def get(r: _Req) -> Any:
        return getattr(r.view, name)

    return get


def _get_path(r: _Req) -> str:
    return r.path


def _get_lower_path(r: _Req) -> str:
    return r.lower_path


def _get_gateway(r: _Req) -> str:
    return r.view.gateway or "mesh"


@dataclass(frozen=True, slots=True)
class _Match:
    index: int  # position in the route's match list; -1 for "no match list"
    conds: tuple[_Cond, ...]
    rewrite_kind: str  # "prefix" (replace the first prefix_len chars) or "full" (replace the path)
    prefix_len: int


_MATCH_ALL: Final = _Match(index=-1, conds=(), rewrite_kind="prefix", prefix_len=1)


def _compile_match(m: HTTPMatchRequest, index: int, where: str) -> _Match:
    conds: list[_Cond] = []
    rewrite_kind, prefix_len = "prefix", 1  # Istio: no uri match is prefix "/"
    if m.uri is not None:
        w = f"{where}: uri"
        test, expect = _string_test(m.uri, w, ignore_case=m.ignore_uri_case and m.uri.regex is None)
        ic = m.ignore_uri_case and m.uri.regex is None
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
        port = m.port
        conds.append(_Cond("port", f"equal {port}", _getter_attr("port"), lambda v: v == port))
    if m.source_labels:
        want = dict(m.source_labels)
        shown = ",".join(f"{k}={v}" for k, v in want.items())

        def labels_ok(have: Mapping[str, str]) -> bool:
            for k, v in want.items():
                if have.get(k) != v:
                    return False
            return True

        conds.append(_Cond("source labels", f"include {shown}", _getter_attr("source_labels"), labels_ok))
    if m.source_namespace is not None:
        ns = m.source_namespace
        conds.append(_Cond("source namespace", f"equal {ns!r}", _getter_attr("source_namespace"), lambda v: v == ns))
    if m.gateways:
        full = frozenset(g for g in m.gateways)
        short = frozenset(g for g in m.gateways if "/" not in g)

        def gw_ok(g: str) -> bool:
            return g in full or (bool(short) and g.rpartition("/")[2] in short)

        conds.append(_Cond("gateway", f"be one of {', '.join(m.gateways)}", _get_gateway, gw_ok))
    return _Match(index, tuple(conds), rewrite_kind, prefix_len)


CLAIM_HEADER: Final = "@request.auth.claims."  # Istio's JWT claim based routing: headers["@request.auth.claims.groups"]


def _claim_getter(path: str) -> Callable[[_Req], tuple[str, ...] | None]:
    """A claim of the verified JWT (``a.b`` nested) as strings; a list claim gives each element."""
    parts = path.split(".")

    def get(r: _Req) -> tuple[str, ...] | None:
        cur: Any = r.view.claims
        for part in parts:
            if not isinstance(cur, Mapping) or part not in cur:
                return None
            cur = cur[part]
        items = cur if isinstance(cur, list) else [cur]
        out = tuple(("true" if x else "false") if isinstance(x, bool) else str(x)
                    for x in items if isinstance(x, (str, int, float, bool)))
        return out or None

    return get


def _any_value(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def any_of(values: tuple[str, ...]) -> bool:
        return any(test(v) for v in values)

    return any_of


def _header_getter(name: str) -> Callable[[_Req], str | None]:
    def get(r: _Req) -> str | None:
        return r.header(name)

    return get


def _param_getter(name: str) -> Callable[[_Req], str | None]:
    def get(r: _Req) -> str | None:
        return r.param(name)

    return get


# ---------------------------------------------------------------- compiled routes


_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_REDIRECT_CODES: Final = frozenset({301, 302, 303, 307, 308})


def _split_host_port(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):  # [v6]:port
        end = authority.find("]")
        if end != -1:
            rest = authority[end + 1 :]
            if rest.startswith(":") and rest[1:].isdigit():
                return authority[: end + 1], int(rest[1:])
            return authority[: end + 1], None
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return authority, None


def _port_of_vhost(name: str) -> int | None:
    _, port = _split_host_port(name)
    return port


@dataclass(frozen=True, slots=True)
class _Dest:
    destination: HTTPRouteDestination
    cluster: str
    weight: int
    request_ops: _Ops | None
    response_ops: HeaderOperations | None


def _to_re_template(rewrite: str) -> str:
    """RE2 substitutions write groups as \\1 and the whole match as \\0;
    Python's re.sub understands \\g<0>, not \\0."""
    return re.sub(r"\\(\d)", r"\\g<\1>", rewrite)


class _Route:
    __slots__ = (
        "index",
        "route",
        "label",
        "matches",
        "kind",
        "redirect_status",
        "direct",
        "dests",
        "cum",
        "total",
        "route_req_ops",
        "route_resp_ops",
        "rewrite_uri",
        "regex_rewrite",
        "rewrite_authority",
        "timeout",
        "retry",
    )

    def __init__(self, route: HTTPRoute, index: int, vh: VirtualHost, settings: Settings) -> None:
        self.index = index
        self.route = route
        self.label = f"route {index}" + (f" {route.name!r}" if route.name else "")
        where = f"virtual host {vh.name!r}, {self.label}"
        self.matches: tuple[_Match, ...] = tuple(
            _compile_match(m, i, f"{where}, match {i}" + (f" {m.name!r}" if m.name else ""))
            for i, m in enumerate(route.match)
        )
        self.route_req_ops = _compile_ops(route.headers.request if route.headers else None)
        self.route_resp_ops = route.headers.response if route.headers else None
        self._check_request_ops(self.route_req_ops, f"{where}: headers.request")
        self.redirect_status = 0
        self.direct: DirectResponse | None = None
        self.dests: tuple[_Dest, ...] = ()
        self.cum: tuple[int, ...] = ()
        self.total = 0
        self.rewrite_uri: str | None = None
        self.regex_rewrite: tuple[Any, str] | None = None
        self.rewrite_authority: str | None = None
        self.timeout: float | None = None
        self.retry: RetryPolicy | None = None
        actions = [n for n, v in (("redirect", route.redirect), ("directResponse", route.direct_response)) if v]
        if route.route:
            actions.append("route")
        if len(actions) > 1:
            raise RouteConfigError(f"{where}: sets {' and '.join(actions)}; a route does exactly one of them")
        if route.redirect is not None:
            self.kind = "redirect"
            code = route.redirect.redirect_code or 301
            if code not in _REDIRECT_CODES:
                raise RouteConfigError(f"{where}: redirectCode {code} is not a redirect status {sorted(_REDIRECT_CODES)}")
            self.redirect_status = code
        elif route.direct_response is not None:
            self.kind = "direct"
            self.direct = self._compile_direct(route, where)
        elif route.route:
            self.kind = "forward"
            self._compile_forward(route, vh, settings, where)
        else:
            raise RouteConfigError(f"{where}: has no route, redirect or directResponse")

    @staticmethod
    def _check_request_ops(ops: _Ops | None, where: str) -> None:
        if ops is None:
            return
        for name in ops.drop | {k for k, _ in ops.append}:
            if name == "host" or name.startswith(":"):
                raise RouteConfigError(f"{where}: cannot change {name!r}; use rewrite.authority")

    def _compile_direct(self, route: HTTPRoute, where: str) -> DirectResponse:
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
        headers = apply_header_ops(headers, self.route_resp_ops)
        return DirectResponse(status=dr.status, body=body, headers=headers, route_index=self.index)

    def _compile_forward(self, route: HTTPRoute, vh: VirtualHost, settings: Settings, where: str) -> None:
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
            self._check_request_ops(req_ops, f"{dw}: headers.request")
            dests.append(
                _Dest(
                    destination=d,
                    cluster=cluster_name(d.destination.host, port, d.destination.subset),
                    weight=w,
                    request_ops=req_ops,
                    response_ops=d.headers.response if d.headers else None,
                )
            )
        self.dests = tuple(dests)
        cum: list[int] = []
        total = 0
        for dest in dests:
            total += dest.weight
            cum.append(total)
        self.cum, self.total = tuple(cum), total
        rw = route.rewrite
        if rw is not None:
            if rw.uri is not None and rw.uri_regex_rewrite is not None:
                raise RouteConfigError(f"{where}: rewrite sets both uri and uriRegexRewrite")
            self.rewrite_uri = rw.uri
            if rw.uri_regex_rewrite is not None:
                try:
                    pat = _regex(rw.uri_regex_rewrite.match)
                except RegexError as e:
                    raise RouteConfigError(
                        f"{where}: rewrite.uriRegexRewrite.match {rw.uri_regex_rewrite.match!r} is not a valid regex: {e}"
                    ) from None
                self.regex_rewrite = (pat, _to_re_template(rw.uri_regex_rewrite.rewrite))
                try:  # a bad group reference would otherwise fail on the first request
                    re.compile("()" * pat.groups).sub(self.regex_rewrite[1], "")
                except (re.error, IndexError) as e:
                    raise RouteConfigError(
                        f"{where}: rewrite.uriRegexRewrite.rewrite {rw.uri_regex_rewrite.rewrite!r}: {e}"
                    ) from None
            self.rewrite_authority = rw.authority or None
        self.timeout = float(route.timeout) if route.timeout else None
        try:
            self.retry = retry_policy(route.retries, settings)
        except RetryConfigError as e:
            raise RouteConfigError(f"{where}: retries: {e}") from None

    # ------------------------------------------------------------ per request

    def first_match(self, r: _Req) -> _Match | None:
        if not self.matches:
            return _MATCH_ALL
        for m in self.matches:
            for c in m.conds:
                if not c.ok(r):
                    break
            else:
                return m
        return None

    def pick(self, rand: random.Random) -> _Dest:
        dests = self.dests
        if len(dests) == 1:
            return dests[0]
        return dests[bisect_right(self.cum, rand.randrange(self.total))]

    def rewrite_path(self, r: _Req, m: _Match) -> str:
        path = r.path
        if self.rewrite_uri is not None:
            if m.rewrite_kind == "full":
                path = self.rewrite_uri
            else:
                path = self.rewrite_uri + path[m.prefix_len :]
        elif self.regex_rewrite is not None:
            pat, template = self.regex_rewrite
            path = pat.sub(template, path)
        else:
            return r.view.path
        q = r.query
        return f"{path}?{q}" if q else path

    def act(self, r: _Req, m: _Match, rand: random.Random, vh_name: str) -> Decision:
        kind = self.kind
        if kind == "forward":
            d = self.pick(rand)
            view = r.view
            headers = view.headers
            if self.route_req_ops is not None:
                headers = _apply(headers, self.route_req_ops)
            if d.request_ops is not None:
                headers = _apply(headers, d.request_ops)
            authority = view.authority
            if self.rewrite_authority is not None:
                authority = self.rewrite_authority
                if any(k == "host" for k, _ in headers):
                    headers = [(k, authority if k == "host" else v) for k, v in headers]
            resp: tuple[HeaderOperations, ...]
            if self.route_resp_ops is None:
                resp = (d.response_ops,) if d.response_ops is not None else ()
            elif d.response_ops is None:
                resp = (self.route_resp_ops,)
            else:
                resp = (self.route_resp_ops, d.response_ops)
            path = self.rewrite_path(r, m) if (self.rewrite_uri is not None or self.regex_rewrite) else view.path
            return Forward(
                route=self.route,
                route_index=self.index,
                virtual_host=vh_name,
                destination=d.destination,
                cluster=d.cluster,
                path=path,
                authority=authority,
                request_headers=headers,
                response_ops=resp,
                timeout=self.timeout,
                retry=self.retry,  # type: ignore[arg-type]
                fault=self.route.fault,
            )
        if kind == "direct":
            dr = self.direct
            assert dr is not None
            return DirectResponse(dr.status, dr.body, list(dr.headers), dr.route_index)
        return Redirect(self.redirect_status, self.location(r), self.index)

    def location(self, r: _Req) -> str:
        rd = self.route.redirect
        assert rd is not None
        view = r.view
        old_scheme = (view.scheme or "http").lower()
        scheme = (rd.scheme or old_scheme).lower()
        host, port = _split_host_port(view.authority)
        if port is None and view.port is not None and rd.derive_port == "FROM_REQUEST_PORT":
            port = view.port
        if rd.authority:
            host, aport = _split_host_port(rd.authority)
            port = aport if aport is not None else port
        if rd.port:
            port = rd.port
        elif rd.derive_port == "FROM_PROTOCOL_DEFAULT":
            port = None
        elif scheme != old_scheme and port == _DEFAULT_PORTS.get(old_scheme):
            port = None
        if port is not None and port == _DEFAULT_PORTS.get(scheme):
            port = None
        if rd.uri is not None:
            path = rd.uri
            if "?" not in path and r.query:
                path = f"{path}?{r.query}"
        else:
            path = view.path
        return f"{scheme}://{host}{f':{port}' if port is not None else ''}{path}"


class _VHost:
    __slots__ = ("vh", "routes")

    def __init__(self, vh: VirtualHost, settings: Settings) -> None:
        self.vh = vh
        self.routes = tuple(_Route(r, i, vh, settings) for i, r in enumerate(vh.routes))


# ---------------------------------------------------------------- router


class Router:
    """A RouteTable compiled once; ``decide`` per request."""

    _CACHE_MAX = 4096

    def __init__(self, table: RouteTable, settings: Settings) -> None:
        self.table = table
        self.settings = settings
        self.warnings: list[str] = []  # duplicate domains and the like, for pilot/CLI to show
        self._vhosts = tuple(_VHost(vh, settings) for vh in table.virtual_hosts)
        self._exact: dict[str, _VHost] = {}
        suffix: list[tuple[str, _VHost]] = []
        prefix: list[tuple[str, _VHost]] = []
        self._default: _VHost | None = None
        seen: dict[str, str] = {}
        for cv in self._vhosts:
            for domain in cv.vh.domains:
                d = domain.lower()
                if d in seen:
                    self.warnings.append(
                        f"domain {domain!r} of virtual host {cv.vh.name!r} is already served by {seen[d]!r}; ignored"
                    )
                    continue
                seen[d] = cv.vh.name
                if d == "*":
                    self._default = cv
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
                    self._exact[d] = cv
        # a ServiceEntry's address ranges: an IP authority inside one (core/route.py _in_subnets)
        self._subnets = tuple((ipaddress.ip_network(n, strict=False), cv.vh.port, cv)
                              for cv in self._vhosts for n in cv.vh.subnets)
        # longest wildcard first (stable: earlier virtual hosts win ties)
        self._suffix = tuple(sorted(suffix, key=lambda t: -len(t[0])))
        self._prefix = tuple(sorted(prefix, key=lambda t: -len(t[0])))
        self._cache: dict[str, tuple[_VHost | None, str]] = {}

    # ------------------------------------------------------------ virtual hosts

    def _lookup(self, authority: str) -> tuple[_VHost | None, str]:
        hit = self._cache.get(authority)
        if hit is not None:
            return hit
        a = authority.lower()
        found: tuple[_VHost | None, str]
        cv = self._exact.get(a)
        if cv is not None:
            found = (cv, f"exact domain {a!r}")
        elif self._subnets and (cv := self._in_subnets(a)) is not None:
            found = (cv, f"address range {', '.join(cv.vh.subnets)}")
        else:
            found = (None, "")
            for sfx, cv in self._suffix:
                if len(a) > len(sfx) and a.endswith(sfx):
                    found = (cv, f"wildcard domain '*{sfx}'")
                    break
            else:
                for pfx, cv in self._prefix:
                    if len(a) > len(pfx) and a.startswith(pfx):
                        found = (cv, f"wildcard domain '{pfx}*'")
                        break
                else:
                    if self._default is not None:
                        found = (self._default, "default domain '*'")
        if len(self._cache) >= self._CACHE_MAX:
            self._cache.clear()
        self._cache[authority] = found
        return found

    def _in_subnets(self, authority: str) -> "_VHost | None":
        """The virtual host whose address range holds an IP authority: with its port
        ("10.0.0.7:8080"), or without one, the first such virtual host (the entry's first port)."""
        host, port = authority, None
        if authority.startswith("["):
            end = authority.find("]")
            host, rest = authority[1:end], authority[end + 1:]
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
        elif authority.count(":") == 1:
            host, _, p = authority.partition(":")
            if not p.isdigit():
                return None
            port = int(p)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        for net, vport, cv in self._subnets:
            if ip.version == net.version and ip in net and (port is None or port == vport):
                return cv
        return None

    def virtual_host(self, authority: str) -> VirtualHost | None:
        """The virtual host serving ``authority``, or None."""
        cv, _ = self._lookup(authority)
        return cv.vh if cv is not None else None

    def elsewhere(self, authority: str) -> list[str]:
        """For a short name no virtual host serves (``reviews``): the ``name.namespace``
        domains that do serve that name in other namespaces (``reviews.bookinfo``), as a
        hint for the reply; a short name is only the caller's own namespace's service
        (pilot/compile.py domains_for). Called on the miss path only."""
        host = authority.lower().rsplit(":", 1)[0] if authority.count(":") == 1 else authority.lower()
        if not host or "." in host or "*" in host:
            return []
        return sorted({d for cv in self._vhosts for d in cv.vh.domains
                       if d.startswith(host + ".") and d.count(".") == 1 and ":" not in d})

    def _no_vhost_hint(self, authority: str) -> str:
        other = self.elsewhere(authority)
        return (f" (a short name is a service of the caller's own namespace; other namespaces have "
                f"{', '.join(other)})") if other else ""

    # ------------------------------------------------------------ decisions

    def decide(self, req: RequestView, rand: random.Random) -> Decision:
        cv, _ = self._lookup(req.authority)
        if cv is None:
            return NoRoute(404, f"no virtual host for {req.authority or '(no authority)'}{self._no_vhost_hint(req.authority)}")
        r = _Req(req)
        for route in cv.routes:
            m = route.first_match(r)
            if m is not None:
                return route.act(r, m, rand, cv.vh.name)
        return NoRoute(404, f"no route matched in virtual host {cv.vh.name}")

    def explain(self, req: RequestView) -> list[str]:
        """A human-readable trace of ``decide`` for ``meshctl route explain``."""
        lines = [
            f"request: {req.method} {req.scheme}://{req.authority}{req.path}"
            + (f" port {req.port}" if req.port is not None else "")
            + f" via {req.gateway or 'mesh'}"
        ]
        cv, how = self._lookup(req.authority)
        if cv is None:
            lines.append(f"no virtual host for {req.authority!r} in route table {self.table.name!r} → 404"
                         f"{self._no_vhost_hint(req.authority)}")
            return lines
        lines.append(f"virtual host {cv.vh.name!r}, selected by {how}")
        r = _Req(req)
        for route in cv.routes:
            m = route.first_match(r)
            if m is None:
                lines.append(f"  {route.label}: no match")
                for i, cm in enumerate(route.matches):
                    failing = next(c for c in cm.conds if not c.ok(r))
                    name: str | None = f" {route.route.match[i].name!r}" if route.route.match[i].name else ""
                    lines.append(f"    match {i}{name}: {failing.why_not(r)}")
                continue
            if m.index < 0:
                lines.append(f"  {route.label}: matches (no match conditions)")
            else:
                name = route.route.match[m.index].name
                shown = "; ".join(f"{c.label} {c.expect}" for c in m.conds) or "no conditions"
                lines.append(f"  {route.label}: matches by match {m.index}" + (f" {name!r}" if name else "") + f" ({shown})")
            lines.extend(self._explain_action(route, r, m, cv.vh.name))
            return lines
        lines.append(f"no route matched in virtual host {cv.vh.name!r} → 404")
        return lines

    @staticmethod
    def _explain_action(route: _Route, r: _Req, m: _Match, vh_name: str) -> list[str]:
        if route.kind == "redirect":
            return [f"→ redirect {route.redirect_status} to {route.location(r)}"]
        if route.kind == "direct":
            dr = route.direct
            assert dr is not None
            return [f"→ direct response {dr.status} with a {len(dr.body)}-byte body"]
        out = []
        for d in route.dests:
            share = 100.0 * d.weight / route.total
            out.append(f"→ forward to {d.cluster} ({share:g}% of requests)")
        path = route.rewrite_path(r, m) if (route.rewrite_uri is not None or route.regex_rewrite) else r.view.path
        if path != r.view.path:
            out.append(f"  path rewritten to {path}")
        if route.rewrite_authority:
            out.append(f"  authority rewritten to {route.rewrite_authority}")
        out.append(f"  timeout {f'{route.timeout:g}s' if route.timeout else 'none'}")
        rp = route.retry
        assert rp is not None
        if rp.attempts:
            codes = f" (status codes {','.join(map(str, sorted(rp.retriable_status_codes)))})" if rp.retriable_status_codes else ""
            per_try = f", {rp.per_try_timeout:g}s per try" if rp.per_try_timeout else ""
            out.append(f"  retries: up to {rp.attempts} on {','.join(sorted(rp.retry_on))}{codes}{per_try}")
        else:
            out.append("  retries: none")
        if route.route.fault is not None:
            out.append("  fault injection configured")
        return out
