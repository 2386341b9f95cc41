"""Routing decisions: which rule a request matches and what to do with it.

Pure: no I/O, no clock, no global random. A ``Router`` is a ``RouteTable``
compiled once (regexes, domain maps, destination weights, clusters, retry
policies, static direct responses) by ``core.routebuild.build_router``, which
also rejects what cannot be served (``RouteConfigError``); ``decide`` then does
only per-request work. The proxy carries out the ``Decision``; ``meshctl route
explain`` traces the same compiled table (``core.routeexplain.explain``).
This module holds the per-request part only: setup.py compiles it with mypyc,
and what runs once per config (routebuild) or only in the CLI (routeexplain)
stays interpreted, out of the compiled library every sidecar keeps resident.

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
import random
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable, Final, Mapping, Sequence

from ..dataclass_slots import DATACLASS_SLOTS
from .errors import CoreConfigError
from ..model.base import EMPTY, HeaderList
from ..model.istio import HeaderOperations, HTTPFaultInjection, HTTPRoute, HTTPRouteDestination
from ..model.proxyconfig import RouteTable, Settings, VirtualHost
from .retry import NO_RETRY, RetryPolicy

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
# What a condition is made of, called per request; core/routebuild.py puts the parts
# together once, when it builds the Router.


class _Cond:
    """One condition of an HTTPMatchRequest: ``get`` reads a value of the request and
    ``test`` checks it; ``label`` and ``expect`` say so in words (core/routeexplain.py)."""

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


def _always(_: Any) -> bool:
    return True


def _equals(want: str) -> Callable[[str], bool]:
    return lambda v: v == want


def _starts_with(prefix: str) -> Callable[[str], bool]:
    return lambda v: v.startswith(prefix)


def _full_match(pattern: Any) -> Callable[[str], bool]:
    full = pattern.fullmatch
    return lambda v: full(v) is not None


def _same(want: object) -> Callable[[Any], bool]:
    return lambda v: v == want


def _labels_include(want: dict[str, str]) -> Callable[[Mapping[str, str]], bool]:
    def labels_ok(have: Mapping[str, str]) -> bool:
        for k, v in want.items():
            if have.get(k) != v:
                return False
        return True

    return labels_ok


def _gateway_in(full: frozenset[str], short: frozenset[str]) -> Callable[[str], bool]:
    def gw_ok(g: str) -> bool:
        return g in full or (bool(short) and g.rpartition("/")[2] in short)

    return gw_ok


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


@dataclass(frozen=True, slots=True)
class _Match:
    index: int  # position in the route's match list; -1 for "no match list"
    conds: tuple[_Cond, ...]
    rewrite_kind: str  # "prefix" (replace the first prefix_len chars) or "full" (replace the path)
    prefix_len: int


_MATCH_ALL: Final = _Match(index=-1, conds=(), rewrite_kind="prefix", prefix_len=1)


# ---------------------------------------------------------------- compiled routes


_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


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


@dataclass(frozen=True, slots=True)
class _Dest:
    destination: HTTPRouteDestination
    cluster: str
    weight: int
    request_ops: _Ops | None
    response_ops: HeaderOperations | None


class _Route:
    """One HTTPRoute as ``decide`` uses it: built (and checked) by core/routebuild.py."""

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

    def __init__(
        self,
        index: int,
        route: HTTPRoute,
        label: str,  # "route 0 'name'"
        matches: tuple[_Match, ...],
        kind: str,  # "forward" | "direct" | "redirect"
        redirect_status: int = 0,
        direct: DirectResponse | None = None,
        dests: tuple[_Dest, ...] = (),
        cum: tuple[int, ...] = (),  # running sums of the destinations' weights
        total: int = 0,
        route_req_ops: _Ops | None = None,
        route_resp_ops: HeaderOperations | None = None,
        rewrite_uri: str | None = None,
        regex_rewrite: tuple[Any, str] | None = None,  # (RE2 pattern, re.sub template)
        rewrite_authority: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy = NO_RETRY,
    ) -> None:
        self.index = index
        self.route = route
        self.label = label
        self.matches = matches
        self.kind = kind
        self.redirect_status = redirect_status
        self.direct = direct
        self.dests = dests
        self.cum = cum
        self.total = total
        self.route_req_ops = route_req_ops
        self.route_resp_ops = route_resp_ops
        self.rewrite_uri = rewrite_uri
        self.regex_rewrite = regex_rewrite
        self.rewrite_authority = rewrite_authority
        self.timeout = timeout
        self.retry = retry

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
                retry=self.retry,
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

    def __init__(self, vh: VirtualHost, routes: tuple[_Route, ...]) -> None:
        self.vh = vh
        self.routes = routes


# ---------------------------------------------------------------- router


class Router:
    """A RouteTable compiled once (by core/routebuild.py's ``build_router``); ``decide``
    per request."""

    _CACHE_MAX = 4096

    def __init__(
        self,
        table: RouteTable,
        settings: Settings,
        vhosts: tuple[_VHost, ...],
        exact: dict[str, _VHost],
        suffix: tuple[tuple[str, _VHost], ...],  # longest first
        prefix: tuple[tuple[str, _VHost], ...],  # longest first
        default: _VHost | None,
        subnets: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None, _VHost], ...],
        warnings: list[str],
    ) -> None:
        self.table = table
        self.settings = settings
        self.warnings = warnings  # duplicate domains and the like, for pilot/CLI to show
        self._vhosts = vhosts
        self._exact = exact
        self._suffix = suffix
        self._prefix = prefix
        self._default = default
        self._subnets = subnets  # a ServiceEntry's address ranges: an IP authority inside one (_in_subnets)
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
