"""Offline semantic checks of Istio resources, like ``istioctl analyze``.

``meshctl route validate`` runs these on the files it is given; ``route apply``
on the files in the context of the rules already applied (``validate(new,
context=applied)``), so a subset or Gateway applied earlier counts. Loading
(loader.resources) has already checked shapes and types; here we check
meaning, across resources too.

Rules (errors unless noted):

- StringMatch: exactly one of exact / prefix / regex (header, query and
  withoutHeaders matches may be empty: presence); queryParams take no prefix.
- regex must compile with RE2, the engine meshctl's proxy uses as Envoy does
  (no lookaround, no backreferences), within Envoy's program-size limit.
- HTTP route: exactly one of route / redirect / directResponse.
- route weights: on all destinations or none; none negative; sum 100.
- destination subset: defined by a DestinationRule for that host (warning
  "referenced subset not found" when no DestinationRule exists for the host).
- duplicate subset names in a DestinationRule.
- two VirtualServices for one host on sidecars (on a Gateway they merge), two
  DestinationRules for one host (and workload selector): warnings, as istioctl's IST0109. The same
  kind/namespace/name twice: warning, the later replaces the earlier.
- VirtualService gateways that name no Gateway given: warning.
- ranges: retries.attempts >= 0, httpStatus 200-599, percentages 0-100,
  ports 1-65535, redirectCode 3xx, directResponse status 200-599.
- loadBalancer: simple and consistentHash not both.
- hosts not empty; a Gateway has servers, each with hosts and, for
  HTTPS/TLS, tls settings.
- enums: LB simple, client/server TLS modes, h2UpgradePolicy, redirect
  derivePort, ServiceEntry location and resolution, PeerAuthentication mode,
  AuthorizationPolicy action (CUSTOM needs a provider).

- what meshctl does not implement (loader/unsupported.py, one table for all of
  Istio's API): "meshctl does not implement <field> yet", never accepted and
  ignored.

Each Finding names the file:line of the offending field when the resource
was loaded by loader.resources in this process (else the document's source).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from ..model import istio as m
from ..model.istio import Resource
from ..core.regex import regex_problem as _re2_problem
from ..model.proxyconfig import fqdn
from ..core.authz import condition_key_supported
from ..core.locality import locality_problem, setting_problems
from ..core.warmup import SLOW_START_POLICIES
from ..core.jwt import parse_jwks
from .resources import source_of
from .unsupported import refused_fields

__all__ = ["Finding", "validate", "has_errors"]

LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
CLIENT_TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
SERVER_TLS_MODES = ("PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL")
TLS_VERSIONS = ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")
H2_UPGRADE_POLICIES = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
DERIVE_PORTS = ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")
LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
PEER_AUTH_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
AUTHZ_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
PROTOCOLS = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "MYSQL", "REDIS", "UDP")


@dataclass(frozen=True, slots=True)
class Finding:
    level: Literal["error", "warning"]
    source: str  # "file.yaml:LINE"
    field: str  # "spec.http[0].route[1].weight"
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.level}: {self.field}: {self.message}"


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.level == "error" for f in findings)


def validate(resources: Sequence[Resource], context: Sequence[Resource] = ()) -> list[Finding]:
    """Check resources on their own and against each other; [] when all is well.

    ``context``: resources already in force (the applied rules), which ``resources``
    are added to or replace. They count for cross-references (subsets, gateways,
    conflicts), but only findings about ``resources`` are reported."""
    return _Validator(resources, context).run()


# ---------------------------------------------------------------- helpers


def _host_key(host: str, namespace: str) -> str:
    if not host or host.startswith("*"):
        return host
    return fqdn(host, namespace)


def _choices(value: str, allowed: Sequence[str]) -> str:
    same_case = [a for a in allowed if a.lower() == value.lower()]
    hint = same_case or difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.6)
    if hint:
        return f"unknown value {value!r} (did you mean {hint[0]}?)"
    return f"unknown value {value!r} (expected one of: {', '.join(allowed)})"


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be used as an Istio regex here, or None (RE2: core/regex.py)."""
    return _re2_problem(pattern)


INGRESS_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "MYSQL", "REDIS")


def ingress_address(text: str) -> str | None:
    """A Sidecar ingress ``bind`` as an IP address, None when it is not one."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return None


def ingress_endpoint(text: str) -> tuple[str, int] | None:
    """A Sidecar ingress ``defaultEndpoint`` (``127.0.0.1:8080``, ``[::1]:8080``,
    ``0.0.0.0:8080``) as (address, port), None when it is not one of those."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    addr = ingress_address(host)
    return (addr, int(port)) if addr is not None else None


# ---------------------------------------------------------------- the checks


class _Validator:
    def __init__(self, resources: Sequence[Resource], context: Sequence[Resource] = ()) -> None:
        self.resources = list(resources)
        self.new_keys = {r.key for r in self.resources}
        self.findings: list[Finding] = []
        self.r: Resource | None = None
        # the set that would be in force after applying in order: last one wins
        latest: dict[tuple[str, str, str], Resource] = {}
        for r in (*context, *self.resources):
            latest[r.key] = r
        self.effective = list(latest.values())
        self.drs: dict[str, list[Resource]] = {}
        self.gateways: set[tuple[str, str]] = set()
        for r in self.effective:
            if isinstance(r.spec, m.DestinationRule):
                self.drs.setdefault(_host_key(r.spec.host, r.namespace), []).append(r)
            elif isinstance(r.spec, m.Gateway):
                self.gateways.add((r.namespace, r.name))

    # -- reporting

    def _add(self, level: Literal["error", "warning"], field: str, message: str) -> None:
        assert self.r is not None
        self.findings.append(Finding(level, source_of(self.r, field), field, message))

    def error(self, field: str, message: str) -> None:
        self._add("error", field, message)

    def warning(self, field: str, message: str) -> None:
        self._add("warning", field, message)

    def enum(self, field: str, value: str | None, allowed: Sequence[str]) -> None:
        if value is not None and value not in allowed:
            self.error(field, _choices(value, allowed))

    def port(self, field: str, number: int | None) -> None:
        if number is not None and not 1 <= number <= 65535:
            self.error(field, f"port {number} is outside 1-65535")

    def percent(self, field: str, value: float | None) -> None:
        if value is not None and not 0 <= value <= 100:
            self.error(field, f"percentage {value:g} is outside 0-100")

    # -- driver

    def run(self) -> list[Finding]:
        defined: dict[tuple[str, str, str], list[Resource]] = {}
        for r in self.resources:
            self.r = r
            defined.setdefault(r.key, []).append(r)
            before = len(self.findings)
            check = getattr(self, f"check_{type(r.spec).__name__}", None)
            if check is not None:
                check(r.spec)
            # configuration meshctl does not carry out is refused by name (loader/unsupported.py),
            # once: a check above may have refused the same field in its own words
            said = [f.field for f in self.findings[before:] if "does not implement" in f.message]
            for field, message in refused_fields(r.kind, r.spec):
                if not any(field == s or field.startswith((s + ".", s + "[")) for s in said):
                    self.error(field, message)
        # One line per resource defined in several places (a folder of alternatives, as
        # Istio's samples are), at the definition that wins: the last.
        for defs in defined.values():
            if len(defs) > 1:
                self.r = r = defs[-1]
                earlier = ", ".join(d.source or "?" for d in defs[:-1])
                self.warning("metadata.name", f"{r.kind} {r.namespace}/{r.name} is defined {len(defs)} times; "
                             f"this last one replaces {earlier}")
        self.check_conflicts()
        return self.findings

    # -- common pieces

    def string_match(self, field: str, sm: m.StringMatch | None, *, may_be_empty: bool = False, prefix_ok: bool = True) -> None:
        if sm is None:
            return
        given = [k for k in ("exact", "prefix", "regex") if getattr(sm, k) is not None]
        if not given and not may_be_empty:
            self.error(field, "one of exact, prefix or regex is required")
        elif len(given) > 1:
            self.error(field, f"only one of exact, prefix or regex may be set, got {' and '.join(given)}")
        if sm.prefix is not None and not prefix_ok:
            self.error(f"{field}.prefix", "prefix matching is not supported here (use exact or regex)")
        if sm.regex is not None:
            problem = regex_problem(sm.regex)
            if problem:
                self.error(f"{field}.regex", problem)

    def string_map(self, field: str, matches, **kw) -> None:
        from .codec import join_path

        for name, sm in matches.items():
            self.string_match(join_path(field, name), sm, **kw)

    def destination(self, field: str, dest: m.Destination) -> None:
        assert self.r is not None
        if not dest.host:
            self.error(f"{field}.host", "destination host is required")
            return
        if dest.port is not None:
            self.port(f"{field}.port.number", dest.port.number)
        if dest.subset is None:
            return
        key = _host_key(dest.host, self.r.namespace)
        drs = self.drs.get(key, [])
        if not drs:
            self.warning(
                f"{field}.subset",
                f"referenced subset not found: no DestinationRule for host {dest.host!r} "
                f"defines subset {dest.subset!r}",
            )
            return
        defined = list(dict.fromkeys(s.name for dr in drs if isinstance(dr.spec, m.DestinationRule) for s in dr.spec.subsets))
        if dest.subset not in defined:
            dr = drs[0]
            self.error(
                f"{field}.subset",
                f"referenced subset not found: DestinationRule {dr.namespace}/{dr.name} for host "
                f"{dest.host!r} defines {', '.join(defined) or 'no subsets'}, not {dest.subset!r}",
            )

    def weights(self, field: str, dests: Sequence) -> None:
        weights = [d.weight for d in dests]
        for i, w in enumerate(weights):
            if w is not None and w < 0:
                self.error(f"{field}[{i}].weight", f"negative weight {w}")
        given = [w for w in weights if w is not None]
        if given and len(given) != len(weights):
            missing = next(i for i, w in enumerate(weights) if w is None)
            self.error(
                f"{field}[{missing}]",
                f"weight missing: {len(given)} of {len(weights)} destinations have a weight; "
                "set it on all of them or on none",
            )
        elif given and sum(given) != 100:
            self.error(field, f"weights sum to {sum(given)}, not 100")

    # -- VirtualService

    def check_RateLimit(self, spec) -> None:
        """meshctl.io RateLimit: the model's own rules (model/ratelimit.py)."""
        from ..model.ratelimit import ratelimit_problems

        for problem in ratelimit_problems(spec):
            field, _, message = problem.partition(": ")
            self.error(field, message)

    def check_Telemetry(self, spec) -> None:
        """telemetry.istio.io Telemetry (model/telemetry_api.py); filter expressions in the CEL subset
        meshctl evaluates (core/celfilter.py)."""
        from ..core.celfilter import CelError, parse
        from ..model.telemetry_api import telemetry_problems

        for problem in telemetry_problems(spec):
            field, _, message = problem.partition(": ")
            self.error(field, message)
        for i, a in enumerate(spec.access_logging):
            if a.filter is not None:
                try:
                    parse(a.filter.expression)
                except CelError as exc:
                    self.error(f"spec.accessLogging[{i}].filter.expression", str(exc))

    def check_VirtualService(self, vs: m.VirtualService) -> None:
        assert self.r is not None
        if not vs.hosts:
            self.delegate_vs(vs)  # no hosts: a delegate VirtualService (pilot/delegate.py)
        for i, h in enumerate(vs.hosts):
            if not h.strip():
                self.error(f"spec.hosts[{i}]", "empty host")
        for i, gw in enumerate(vs.gateways):
            if gw == "mesh":
                continue
            ns, _, name = gw.rpartition("/")
            if (ns or self.r.namespace, name) not in self.gateways:
                self.warning(f"spec.gateways[{i}]", f"referenced gateway not found: {gw!r}")
        for i, route in enumerate(vs.http):
            self.http_route(f"spec.http[{i}]", route)
        on_mesh = not vs.gateways or "mesh" in vs.gateways
        l4: tuple[tuple[str, Sequence[m.TCPRoute | m.TLSRoute]], ...] = (("tcp", vs.tcp), ("tls", vs.tls))
        for kind, routes in l4:
            for i, troute in enumerate(routes):
                path = f"spec.{kind}[{i}]"
                if kind == "tls" and on_mesh:
                    self.error(path, "meshctl does not implement tls routes on sidecars (gateways: mesh); "
                               "they apply on gateways only")
                if not troute.route:
                    self.error(f"{path}.route", "at least one destination is required")
                self.weights(f"{path}.route", troute.route)
                for j, d in enumerate(troute.route):
                    self.destination(f"{path}.route[{j}].destination", d.destination)
                matches: Sequence[m.L4MatchAttributes | m.TLSMatchAttributes] = troute.match
                for j, match in enumerate(matches):
                    self.port(f"{path}.match[{j}].port", match.port)

    def delegate_route(self, path: str, route: m.HTTPRoute, actions: list[str]) -> None:
        assert self.r is not None
        if actions:
            self.error(f"{path}.delegate", f"delegate cannot be set together with {' and '.join(actions)}")
        if not route.delegate or not route.delegate.name:
            self.error(f"{path}.delegate.name", "the delegate VirtualService's name is required")
            return
        if self.r.spec.hosts:  # type: ignore[attr-defined]
            self.no_regex(path, route)
        key = (route.delegate.namespace or self.r.namespace, route.delegate.name)
        child = next((r for r in self.effective if isinstance(r.spec, m.VirtualService) and (r.namespace, r.name) == key), None)
        if child is None:
            self.warning(f"{path}.delegate", f"delegate VirtualService {key[0]}/{key[1]} not found: "
                         "this route applies to nothing until it is applied")
        elif child.spec.hosts:  # type: ignore[attr-defined]
            self.error(f"{path}.delegate", f"VirtualService {key[0]}/{key[1]} has hosts: only one without hosts "
                       "can be a delegate")

    def delegate_vs(self, vs: m.VirtualService) -> None:
        """A VirtualService without hosts is a delegate: its http routes apply under a root
        VirtualService's route that names it, with the root's hosts and gateways."""
        assert self.r is not None
        if not vs.http:
            self.error("spec.hosts", "at least one host is required (a delegate VirtualService, "
                       "without hosts, needs http routes)")
            return
        if vs.gateways:
            self.error("spec.gateways", "a delegate VirtualService (no hosts) applies on its root's gateways: "
                       "gateways cannot be set here")
        for kind, routes in (("tcp", vs.tcp), ("tls", vs.tls)):
            if routes:
                self.error(f"spec.{kind}", f"a delegate VirtualService (no hosts) takes http routes only, not {kind}")
        for i, route in enumerate(vs.http):
            if route.delegate is not None:
                self.error(f"spec.http[{i}].delegate", "one level of delegation only: a delegate VirtualService "
                           "(no hosts) cannot delegate again")
            self.no_regex(f"spec.http[{i}]", route)
        me = (self.r.namespace, self.r.name)
        if not any(isinstance(r.spec, m.VirtualService) and any(
                h.delegate is not None and (h.delegate.namespace or r.namespace, h.delegate.name) == me
                for h in r.spec.http) for r in self.effective):
            self.error("spec.hosts", "at least one host is required (a VirtualService without hosts is a "
                       f"delegate, and no root VirtualService delegates to {me[0]}/{me[1]}: apply them together)")

    def no_regex(self, path: str, route: m.HTTPRoute) -> None:
        for j, match in enumerate(route.match):
            for name in ("uri", "scheme", "method", "authority"):
                sm = getattr(match, name)
                if sm is not None and sm.regex is not None:
                    self.error(f"{path}.match[{j}].{name}.regex", "a regex match cannot be used with delegation "
                               "(Istio: a delegate's matches must be a checkable subset of the root's)")

    def http_route(self, path: str, route: m.HTTPRoute) -> None:
        for j, match in enumerate(route.match):
            mp = f"{path}.match[{j}]"
            for name in ("uri", "scheme", "method", "authority"):
                self.string_match(f"{mp}.{name}", getattr(match, name))
            self.string_map(f"{mp}.headers", match.headers, may_be_empty=True)
            self.string_map(f"{mp}.withoutHeaders", match.without_headers, may_be_empty=True)
            self.string_map(f"{mp}.queryParams", match.query_params, may_be_empty=True, prefix_ok=False)
            self.port(f"{mp}.port", match.port)
        actions = [n for n, v in (("route", route.route), ("redirect", route.redirect), ("directResponse", route.direct_response)) if v]
        if route.delegate is not None:
            self.delegate_route(path, route, actions)
        elif not actions:
            self.error(path, "an HTTP route needs one of route, redirect or directResponse")
        elif len(actions) > 1:
            self.error(f"{path}.{actions[1]}", f"{' and '.join(actions)} cannot be set together on one HTTP route")
        self.weights(f"{path}.route", route.route)
        for j, d in enumerate(route.route):
            self.destination(f"{path}.route[{j}].destination", d.destination)
        if route.redirect is not None:
            rp, rd = f"{path}.redirect", route.redirect
            self.port(f"{rp}.port", rd.port)
            self.enum(f"{rp}.derivePort", rd.derive_port, DERIVE_PORTS)
            if rd.port is not None and rd.derive_port is not None:
                self.error(rp, "port and derivePort cannot both be set")
            if rd.redirect_code is not None and not 300 <= rd.redirect_code <= 399:
                self.error(f"{rp}.redirectCode", f"redirect code {rd.redirect_code} is not a 3xx status")
        if route.direct_response is not None:
            dp, dr = f"{path}.directResponse", route.direct_response
            if not 200 <= dr.status <= 599:
                self.error(f"{dp}.status", f"status {dr.status} is outside 200-599")
            if dr.body is not None and dr.body.string is not None and dr.body.bytes is not None:
                self.error(f"{dp}.body", "only one of string or bytes may be set")
        if route.retries is not None and route.retries.attempts < 0:
            self.error(f"{path}.retries.attempts", f"attempts must not be negative, got {route.retries.attempts}")
        if route.fault is not None:
            self.fault(f"{path}.fault", route.fault)
        if route.mirror is not None and route.mirrors:
            self.error(f"{path}.mirrors", "mirror and mirrors cannot both be set (use mirrors)")
        if route.mirror is not None:
            self.destination(f"{path}.mirror", route.mirror)
        if route.mirror_percentage is not None:
            self.percent(f"{path}.mirrorPercentage.value", route.mirror_percentage.value)
        self.percent(f"{path}.mirrorPercent", route.mirror_percent)
        for j, mirror in enumerate(route.mirrors):
            self.destination(f"{path}.mirrors[{j}].destination", mirror.destination)
            if mirror.percentage is not None:
                self.percent(f"{path}.mirrors[{j}].percentage.value", mirror.percentage.value)
        if route.cors_policy is not None:
            for j, origin in enumerate(route.cors_policy.allow_origins):
                self.string_match(f"{path}.corsPolicy.allowOrigins[{j}]", origin)
        if route.rewrite is not None and route.rewrite.uri_regex_rewrite is not None:
            if route.rewrite.uri is not None:
                self.error(f"{path}.rewrite", "uri and uriRegexRewrite cannot both be set")
            problem = regex_problem(route.rewrite.uri_regex_rewrite.match)
            if problem:
                self.error(f"{path}.rewrite.uriRegexRewrite.match", problem)

    def fault(self, path: str, fault: m.HTTPFaultInjection) -> None:
        if fault.delay is None and fault.abort is None:
            self.error(path, "a fault needs a delay or an abort")
        if fault.delay is not None:
            d = fault.delay
            if d.fixed_delay is None:
                self.error(f"{path}.delay", "fixedDelay is required")
            elif d.fixed_delay < 0.001:
                self.error(f"{path}.delay.fixedDelay", f"a delay must be at least 1ms, got {float(d.fixed_delay):g}s")
            if d.percentage is not None:
                self.percent(f"{path}.delay.percentage.value", d.percentage.value)
            self.percent(f"{path}.delay.percent", d.percent)
        if fault.abort is not None:
            a = fault.abort
            if a.http_status is None and a.grpc_status is None:
                self.error(f"{path}.abort", "httpStatus or grpcStatus is required")
            if a.http_status is not None and a.grpc_status is not None:
                self.error(f"{path}.abort", "only one of httpStatus and grpcStatus may be set")
            if a.http_status is not None and not 200 <= a.http_status <= 599:
                self.error(f"{path}.abort.httpStatus", f"HTTP status {a.http_status} is outside 200-599")
            if a.percentage is not None:
                self.percent(f"{path}.abort.percentage.value", a.percentage.value)
            self.percent(f"{path}.abort.percent", a.percent)

    # -- DestinationRule

    def check_DestinationRule(self, dr: m.DestinationRule) -> None:
        if not dr.host.strip():
            self.error("spec.host", "host is required")
        if dr.traffic_policy is not None:
            self.traffic_policy("spec.trafficPolicy", dr.traffic_policy)
        first: dict[str, int] = {}
        for i, subset in enumerate(dr.subsets):
            sp = f"spec.subsets[{i}]"
            if not subset.name:
                self.error(f"{sp}.name", "subset name is required")
            elif subset.name in first:
                self.error(f"{sp}.name", f"duplicate subset name {subset.name!r} (also spec.subsets[{first[subset.name]}])")
            else:
                first[subset.name] = i
            if subset.traffic_policy is not None:
                self.traffic_policy(f"{sp}.trafficPolicy", subset.traffic_policy)

    def traffic_policy(self, path: str, tp: m.TrafficPolicy | m.PortTrafficPolicy) -> None:
        lb = tp.load_balancer
        if lb is not None:
            lp = f"{path}.loadBalancer"
            self.enum(f"{lp}.simple", lb.simple, LB_SIMPLE)
            if lb.simple is not None and lb.consistent_hash is not None:
                self.error(lp, "simple and consistentHash cannot both be set")
            ch = lb.consistent_hash
            if ch is not None:
                keys = [
                    name
                    for name, v in (
                        ("httpHeaderName", ch.http_header_name),
                        ("httpCookie", ch.http_cookie),
                        ("useSourceIp", ch.use_source_ip or None),
                        ("httpQueryParameterName", ch.http_query_parameter_name),
                    )
                    if v is not None
                ]
                if not keys:
                    self.error(f"{lp}.consistentHash", "one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required")
                elif len(keys) > 1:
                    self.error(f"{lp}.consistentHash", f"only one hash key may be set, got {' and '.join(keys)}")
                if ch.ring_hash is not None and ch.maglev is not None:
                    self.error(f"{lp}.consistentHash", "ringHash and maglev cannot both be set")
            self.locality_and_warmup(lp, lb, tp.outlier_detection is not None)
        if tp.tls is not None:
            self.enum(f"{path}.tls.mode", tp.tls.mode, CLIENT_TLS_MODES)
            if tp.tls.mode == "ISTIO_MUTUAL" and tp.tls.sni:
                self.error(f"{path}.tls.sni", "meshctl does not implement sni with ISTIO_MUTUAL yet "
                                              "(sidecars send no SNI; they check each other's SPIFFE identity)")
        cp = tp.connection_pool
        if cp is not None and cp.http is not None:
            self.enum(f"{path}.connectionPool.http.h2UpgradePolicy", cp.http.h2_upgrade_policy, H2_UPGRADE_POLICIES)
        od = tp.outlier_detection
        if od is not None:
            self.percent(f"{path}.outlierDetection.maxEjectionPercent", od.max_ejection_percent)
            self.percent(f"{path}.outlierDetection.minHealthPercent", od.min_health_percent)
        if isinstance(tp, m.TrafficPolicy):
            for i, pl in enumerate(tp.port_level_settings):
                pp = f"{path}.portLevelSettings[{i}]"
                if pl.port is None or pl.port.number is None:
                    self.error(f"{pp}.port", "port.number is required in portLevelSettings")
                else:
                    self.port(f"{pp}.port.number", pl.port.number)
                self.traffic_policy(pp, pl)

    def locality_and_warmup(self, lp: str, lb: m.LoadBalancerSettings, outlier_detection: bool) -> None:
        ll = lb.locality_lb_setting
        if ll is not None:
            for field, msg in setting_problems(ll):
                self.error(f"{lp}.localityLbSetting.{field}", msg)
            if not ll.distribute and not outlier_detection and ll.enabled is not False:
                # Istio accepts this and does no failover; meshctl refuses what it would not carry out.
                self.error(f"{lp}.localityLbSetting", "failover has no effect without outlierDetection in the same "
                           "traffic policy (as in Istio): meshctl refuses it rather than do no locality failover; "
                           "add outlierDetection, or use distribute")
        for name, val in (("warmupDurationSecs", lb.warmup_duration_secs), ("warmup.duration", lb.warmup.duration if lb.warmup else None)):
            if val is None:
                continue
            if float(val) <= 0:
                self.error(f"{lp}.{name}", "must be positive")
            elif lb.consistent_hash is not None or lb.simple not in SLOW_START_POLICIES:
                self.error(f"{lp}.{name}", "meshctl does not implement slow start with "
                           f"{'consistentHash' if lb.consistent_hash is not None else lb.simple} yet (as Envoy, only "
                           "with ROUND_ROBIN and LEAST_REQUEST)")
        if lb.warmup is not None:
            if lb.warmup.duration is None:
                self.error(f"{lp}.warmup.duration", "duration is required")
            if lb.warmup.minimum_percent is not None and not 0 <= lb.warmup.minimum_percent <= 100:
                self.error(f"{lp}.warmup.minimumPercent", "must be between 0 and 100")
            if lb.warmup.aggression is not None and lb.warmup.aggression < 1:
                self.error(f"{lp}.warmup.aggression", "must be at least 1.0")

    # -- ServiceEntry

    def check_ServiceEntry(self, se: m.ServiceEntry) -> None:
        if not se.hosts:
            self.error("spec.hosts", "at least one host is required")
        for i, h in enumerate(se.hosts):
            if not h.strip():
                self.error(f"spec.hosts[{i}]", "empty host")
        for i, p in enumerate(se.ports):
            self.port(f"spec.ports[{i}].number", p.number)
            self.port(f"spec.ports[{i}].targetPort", p.target_port)
            if p.protocol is not None and p.protocol.upper() not in PROTOCOLS:
                self.warning(f"spec.ports[{i}].protocol", f"unknown protocol {p.protocol!r}: treated as TCP")
        for i, a in enumerate(se.addresses):
            if ingress_address(a.split("/", 1)[0]) is None:
                self.error(f"spec.addresses[{i}]", f"{a!r} is not an IP address or a CIDR range")
            else:
                import ipaddress

                try:
                    ipaddress.ip_network(a, strict=False)
                except ValueError:
                    self.error(f"spec.addresses[{i}]", f"{a!r} is not an IP address or a CIDR range")
        self.enum("spec.location", se.location, LOCATIONS)
        self.enum("spec.resolution", se.resolution, RESOLUTIONS)
        if se.resolution in ("DNS", "DNS_ROUND_ROBIN") and not se.endpoints:
            for i, h in enumerate(se.hosts):
                if "*" in h:
                    self.error(f"spec.hosts[{i}]", f"wildcard host {h!r} cannot be resolved by DNS: give endpoints")
        if se.resolution == "STATIC" and not se.endpoints and se.workload_selector is None:
            self.error("spec.resolution", "resolution STATIC needs endpoints (or a workloadSelector)")
        for i, ep in enumerate(se.endpoints):
            if not ep.address and se.resolution == "STATIC":
                self.error(f"spec.endpoints[{i}].address", "address is required")
            for name, number in ep.ports.items():
                self.port(f"spec.endpoints[{i}].ports.{name}", number)
            if ep.locality and locality_problem(ep.locality):
                self.error(f"spec.endpoints[{i}].locality", str(locality_problem(ep.locality)))

    # -- Sidecar

    def check_Sidecar(self, sc: m.Sidecar) -> None:
        for i, ing in enumerate(sc.ingress):
            ip = f"spec.ingress[{i}]"
            if ing.port.number == 0:
                self.error(f"{ip}.port.number", "port number is required (0, a unix domain socket listener, "
                           "is not one meshctl opens)")
            else:
                self.port(f"{ip}.port.number", ing.port.number)
            proto = (ing.port.protocol or "HTTP").upper()
            if proto == "HTTPS":
                self.error(f"{ip}.port.protocol", "meshctl does not implement protocol HTTPS yet on sidecar ingress "
                           "(the mesh's mTLS protects inbound traffic)")
            elif proto not in INGRESS_PROTOCOLS:
                self.error(f"{ip}.port.protocol", _choices(ing.port.protocol or "", INGRESS_PROTOCOLS))
            if ing.bind is not None and ingress_address(ing.bind) is None:
                self.error(f"{ip}.bind", "meshctl does not implement unix domain socket binds yet"
                           if ing.bind.startswith("unix:") else f"{ing.bind!r} is not an IP address")
            if ing.default_endpoint is not None and ingress_endpoint(ing.default_endpoint) is None:
                self.error(f"{ip}.defaultEndpoint", "meshctl does not implement unix domain socket endpoints yet"
                           if ing.default_endpoint.startswith("unix:")
                           else f"{ing.default_endpoint!r} is not 127.0.0.1:PORT (or 0.0.0.0:PORT)")
        if sc.outbound_traffic_policy is not None:
            self.enum("spec.outboundTrafficPolicy.mode", sc.outbound_traffic_policy.mode, ("ALLOW_ANY", "REGISTRY_ONLY"))
        for i, eg in enumerate(sc.egress):
            if not eg.hosts:
                self.error(f"spec.egress[{i}].hosts", "at least one host is required")
            for j, h in enumerate(eg.hosts):
                ns, sep, name = h.partition("/")
                if not sep or not ns or not name:
                    self.error(f"spec.egress[{i}].hosts[{j}]", f"{h!r} is not namespace/dnsName (such as ./* or istio-system/*)")

    # -- WorkloadEntry

    def check_WorkloadEntry(self, we: m.WorkloadEntry) -> None:
        if not we.address.strip():
            self.error("spec.address", "address is required")
        for name, number in we.ports.items():
            self.port(f"spec.ports.{name}", number)
        if we.locality and locality_problem(we.locality):
            self.error("spec.locality", str(locality_problem(we.locality)))

    def check_WorkloadGroup(self, wg: m.WorkloadGroup) -> None:
        assert self.r is not None
        t = wg.template
        if t is not None and t.locality and locality_problem(t.locality):
            self.error("spec.template.locality", str(locality_problem(t.locality)))
        if t is not None and t.service_account and ("/" in t.service_account or not t.service_account.strip()):
            self.error("spec.template.serviceAccount", f"{t.service_account!r} cannot be part of a SPIFFE ID")
        if self.r.namespace != "default":
            self.warning("metadata.namespace", "registry instances are in namespace default, or in a mesh's "
                         f"settings.namespace: a WorkloadGroup of {self.r.namespace!r} takes only those of a mesh whose "
                         f"settings.namespace is {self.r.namespace!r} (instances name their group with the label workload-group)")

    # -- Gateway

    def check_Gateway(self, gw: m.Gateway) -> None:
        if not gw.servers:
            self.error("spec.servers", "a Gateway needs at least one server")
        for i, server in enumerate(gw.servers):
            sp = f"spec.servers[{i}]"
            if server.port.number == 0:
                self.error(f"{sp}.port.number", "port number is required")
            else:
                self.port(f"{sp}.port.number", server.port.number)
            if not server.port.protocol:
                self.error(f"{sp}.port.protocol", "protocol is required")
            elif server.port.protocol.upper() not in PROTOCOLS:
                self.error(f"{sp}.port.protocol", _choices(server.port.protocol, PROTOCOLS))
            self.server_tls(sp, server)
            if not server.hosts:
                self.error(f"{sp}.hosts", "at least one host is required")
            if server.tls is not None:
                self.enum(f"{sp}.tls.mode", server.tls.mode, SERVER_TLS_MODES)
                self.enum(f"{sp}.tls.minProtocolVersion", server.tls.min_protocol_version, TLS_VERSIONS)
                self.enum(f"{sp}.tls.maxProtocolVersion", server.tls.max_protocol_version, TLS_VERSIONS)
            elif server.port.protocol.upper() in ("HTTPS", "TLS"):
                self.error(f"{sp}.tls", f"a {server.port.protocol} server needs tls settings")

    def server_tls(self, sp: str, server: m.Server) -> None:
        t, proto = server.tls, (server.port.protocol or "").upper()
        if t is None:
            return
        if proto not in ("HTTPS", "TLS"):
            given = [n for n, v in (("mode", t.mode), ("credentialName", t.credential_name),
                                    ("serverCertificate", t.server_certificate)) if v]
            if given:
                self.error(f"{sp}.tls.{given[0]}", f"tls.{given[0]} needs protocol HTTPS or TLS, not {server.port.protocol} "
                           "(on an HTTP server, tls takes only httpsRedirect)")
            return
        if not t.mode:
            self.error(f"{sp}.tls.mode", f"a {server.port.protocol} server needs tls.mode (SIMPLE, MUTUAL, PASSTHROUGH, ...)")
        elif t.mode in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"):
            if t.credential_name:
                from ..secrets import name_problem

                if (bad := name_problem(t.credential_name)) is not None:
                    self.error(f"{sp}.tls.credentialName", bad)
            if not t.credential_name and not (t.server_certificate and t.private_key):
                self.error(f"{sp}.tls", f"mode {t.mode} needs credentialName, or serverCertificate and privateKey")
            if t.credential_name and (t.server_certificate or t.private_key):
                self.error(f"{sp}.tls.credentialName", "give credentialName or serverCertificate/privateKey, not both")
        elif t.mode in ("PASSTHROUGH", "ISTIO_MUTUAL"):
            for n, v in (("credentialName", t.credential_name), ("serverCertificate", t.server_certificate),
                         ("privateKey", t.private_key), ("caCertificates", t.ca_certificates)):
                if v:
                    self.error(f"{sp}.tls.{n}", f"mode {t.mode} takes no {n} "
                               + ("(the bytes pass untouched)" if t.mode == "PASSTHROUGH" else "(the gateway's mesh identity is used)"))

    # -- security.istio.io

    def check_PeerAuthentication(self, pa: m.PeerAuthentication) -> None:
        if pa.mtls is not None:
            self.enum("spec.mtls.mode", pa.mtls.mode, PEER_AUTH_MODES)
        if pa.port_level_mtls and pa.selector is None:
            self.error("spec.portLevelMtls", "portLevelMtls needs a selector")
        for port, mtls in pa.port_level_mtls.items():
            self.port(f"spec.portLevelMtls.{port}", port)
            self.enum(f"spec.portLevelMtls.{port}.mode", mtls.mode, PEER_AUTH_MODES)

    def check_AuthorizationPolicy(self, ap: m.AuthorizationPolicy) -> None:
        self.enum("spec.action", ap.action, AUTHZ_ACTIONS)
        if ap.action == "CUSTOM" and not ap.provider.get("name"):
            self.error("spec.provider", "action CUSTOM needs provider.name")
        if ap.provider and ap.action != "CUSTOM":
            self.error("spec.provider", "provider is only allowed with action CUSTOM")
        for i, rule in enumerate(ap.rules or ()):
            for j, to in enumerate(rule.to):
                if to.operation is None:
                    continue
                for field, ports in (("ports", to.operation.ports), ("notPorts", to.operation.not_ports)):
                    for k, p in enumerate(ports):
                        fp = f"spec.rules[{i}].to[{j}].operation.{field}[{k}]"
                        if not p.isdigit():
                            self.error(fp, f"port {p!r} is not a number")
                        else:
                            self.port(fp, int(p))
            for j, cond in enumerate(rule.when):
                if not cond.key:
                    self.error(f"spec.rules[{i}].when[{j}].key", "key is required")
                elif not condition_key_supported(cond.key):
                    self.error(f"spec.rules[{i}].when[{j}].key",
                               f"meshctl does not implement condition key {cond.key!r} yet")
                if not cond.values and not cond.not_values:
                    self.error(f"spec.rules[{i}].when[{j}]", "values or notValues is required")

    def check_RequestAuthentication(self, ra: m.RequestAuthentication) -> None:
        issuers: dict[str, int] = {}
        for i, rule in enumerate(ra.jwt_rules):
            rp = f"spec.jwtRules[{i}]"
            if not rule.issuer:
                self.error(f"{rp}.issuer", "issuer is required")
            elif rule.issuer in issuers:
                self.error(f"{rp}.issuer", f"issuer {rule.issuer!r} is also in spec.jwtRules[{issuers[rule.issuer]}]")
            else:
                issuers[rule.issuer] = i
            self.enum(f"{rp}.presence", rule.presence, ("OPTIONAL", "REQUIRED"))
            if rule.jwks is not None and rule.jwks_uri is not None:
                self.error(f"{rp}.jwks", "jwks and jwksUri cannot both be set")
            if rule.jwks is not None:
                try:
                    if not parse_jwks(rule.jwks):
                        self.error(f"{rp}.jwks", "the JWKS has no usable signing key (RSA, EC P-256/384/521 or Ed25519)")
                except ValueError as e:
                    self.error(f"{rp}.jwks", f"invalid JWKS: {e}")
            if rule.jwks_uri is not None and not rule.jwks_uri.startswith(("http://", "https://")):
                self.error(f"{rp}.jwksUri", f"jwksUri {rule.jwks_uri!r} is not an http:// or https:// URL")
            if rule.jwks is None and rule.jwks_uri is None and not rule.issuer.startswith(("http://", "https://")):
                self.error(f"{rp}.issuer", "without jwks or jwksUri the keys are found by OpenID discovery from the "
                           f"issuer, which needs an http(s) URL, not {rule.issuer!r}")
            for j, h in enumerate(rule.from_headers):
                if not h.name.strip():
                    self.error(f"{rp}.fromHeaders[{j}].name", "header name is required")
            for j, c in enumerate(rule.output_claim_to_headers):
                if not c.header.strip():
                    self.error(f"{rp}.outputClaimToHeaders[{j}].header", "header is required")
                if not c.claim.strip():
                    self.error(f"{rp}.outputClaimToHeaders[{j}].claim", "claim is required")

    # -- across resources

    def check_conflicts(self) -> None:
        vs_owner: dict[tuple[str, str], Resource] = {}
        dr_owner: dict[tuple[str, object], Resource] = {}
        # rules already in force claim their hosts first; the new ones get the warnings
        ordered = sorted(self.effective, key=lambda r: r.key in self.new_keys)
        for r in ordered:
            self.r = r
            report = r.key in self.new_keys
            if isinstance(r.spec, m.VirtualService):
                reported: set[tuple[str, str, str]] = set()
                for i, host in enumerate(r.spec.hosts):
                    for gw in r.spec.gateways or ("mesh",):
                        if gw != "mesh":
                            continue  # on a Gateway, VirtualServices of one host merge (pilot/compile.py), as in Istio
                        gw_key = gw
                        other = vs_owner.setdefault((_host_key(host, r.namespace), gw_key), r)
                        if report and other is not r and other.key not in reported:
                            reported.add(other.key)
                            self.warning(
                                f"spec.hosts[{i}]",
                                f"conflicting VirtualServices for host {host!r}: also defined by "
                                f"VirtualService {other.namespace}/{other.name} ({other.source or '?'})",
                            )
            elif isinstance(r.spec, m.DestinationRule):
                other = dr_owner.setdefault((_host_key(r.spec.host, r.namespace), r.spec.workload_selector), r)
                if report and other is not r:
                    self.warning(
                        "spec.host",
                        f"conflicting DestinationRules for host {r.spec.host!r}: also defined by "
                        f"DestinationRule {other.namespace}/{other.name} ({other.source or '?'})",
                    )
