"""Authorization decisions: Istio's AuthorizationPolicy, as a pure function.

Rules (Istio's, https://istio.io/latest/docs/concepts/security/#authorization-policies):

1. The policies given are those that apply to the workload (selector matched,
   same namespace or the root namespace; see ``applicable``).
2. CUSTOM policies come first: ``custom_check`` names the provider of the
   first one that matches, and the proxy asks that external authorizer
   (core.extauthz) before ``authorize``, which leaves CUSTOM policies out.
3. If any DENY policy matches the request → deny.
4. If no ALLOW policy applies to the workload → allow.
5. If any ALLOW policy matches the request → allow; otherwise → deny.
6. AUDIT policies never change the decision; matching ones are listed in
   ``AuthzDecision.audit``.

A policy matches when one of its rules matches. A policy without rules
(``spec: {}`` or ``rules: []``) matches nothing, so an ALLOW policy without
rules is Istio's "allow-nothing"; an empty rule ``{}`` matches everything
(``rules: [{}]`` is "allow-all" / "deny-all").

Within a rule: ``from``, ``to`` and ``when`` are ANDed; the entries of
``from`` (and of ``to``) are ORed; within one source/operation every field
that is set must hold (AND); the values of a field are ORed; a ``not*``
field holds when none of its values match. ``when`` conditions are ANDed;
a condition's ``values`` are ORed and its ``notValues`` must all miss.

String values match as Istio does: exact, ``prefix*``, ``*suffix``, or ``*``
(present and non-empty). Paths also accept Istio's templates ``{*}`` (one
segment) and ``{**}`` (the rest); paths are compared without the query string
and after removing dot segments.

End-user attributes come from a verified JWT (core.jwt, RequestAuthentication):
``requestPrincipals`` match ``iss/sub``; ``request.auth.principal``,
``request.auth.audiences``, ``request.auth.presenter`` (``azp``) and
``request.auth.claims[name]`` (nested: ``[a][b]``; a list claim matches when
any element does). Without a verified JWT these attributes are absent: a
value never matches them, a ``not*`` value never excludes.

Attributes meshctl cannot evaluate (unknown ``when`` keys, which
``route validate`` refuses by name) follow Istio's rule for fields a proxy
cannot see: in an ALLOW policy the field never matches; in a DENY or AUDIT
policy it is treated as matching, so an unsupported field never opens access.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

from ..model.istio import AuthorizationPolicy, Condition, Operation, Rule, Source, WorkloadSelector

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
ROOT_NAMESPACE = "istio-system"

SUPPORTED_CONDITION_KEYS = (
    "request.headers[",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
)


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """The end user, from a verified JWT (core.jwt)."""

    principal: str  # "iss/sub"
    issuer: str = ""
    claims: Mapping[str, object] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    presenter: str = ""  # azp


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    method: str
    path: str  # as received: "/api/v1/products?x=1"
    host: str  # Host / :authority
    port: int  # destination (inbound listener's service) port
    headers: Sequence[tuple[str, str]] = ()  # lower-case names, as in protocol.events.HeaderList
    source_principal: str | None = None  # peer SPIFFE ID from mTLS ("spiffe://td/ns/x/sa/y"), None without mTLS
    source_ip: str = ""  # the direct peer's address
    source_namespace: str | None = None  # None: taken from the principal
    remote_ip: str | None = None  # original client (X-Forwarded-For, trusted hops); None: source_ip
    destination_ip: str | None = None
    sni: str | None = None  # server name of the TLS ClientHello; None: plaintext or no SNI
    auth: RequestAuth | None = None  # verified JWT (RequestAuthentication); None: no token


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str | None  # "namespace/name" of the deciding policy, None when no policy decided
    reason: str
    audit: tuple[str, ...] = ()  # AUDIT policies that matched


# ---------------------------------------------------------------- which policies apply


def selector_matches(selector: WorkloadSelector | Mapping[str, str] | None, workload_labels: Mapping[str, str]) -> bool:
    """A missing or empty selector selects every workload; otherwise all labels must equal."""
    if selector is None:
        return True
    labels = selector.match_labels if isinstance(selector, WorkloadSelector) else selector
    return all(workload_labels.get(k) == v for k, v in labels.items())


def applicable(
    policies: Iterable[tuple[str, str, AuthorizationPolicy]],
    workload_namespace: str,
    workload_labels: Mapping[str, str],
    root_namespace: str = ROOT_NAMESPACE,
) -> list[tuple[str, AuthorizationPolicy]]:
    """From (namespace, name, policy) triples, those that apply to one workload,
    as ``authorize`` wants them. Root-namespace policies apply mesh-wide."""
    out = []
    for ns, name, pol in policies:
        if ns != workload_namespace and ns != root_namespace:
            continue
        if selector_matches(pol.selector, workload_labels):
            out.append((f"{ns}/{name}", pol))
    return out


# ---------------------------------------------------------------- the decision


def authorize(policies: Sequence[tuple[str, AuthorizationPolicy]], req: AuthzRequest) -> AuthzDecision:
    """Decide one request. ``policies`` are (``"namespace/name"``, spec) pairs
    already filtered to those whose selector matches this workload."""
    ctx = _Context(req)
    note = ""
    audit = tuple(n for n, p in policies if _action(p) == AUDIT and _policy_matches(p, ctx, AUDIT) is not None)
    for name, pol in policies:
        if _action(pol) == DENY:
            hit = _policy_matches(pol, ctx, DENY)
            if hit is not None:
                return AuthzDecision(False, name, f"denied by DENY policy {name} (rule {hit}){note}", audit)
    allow = [(n, p) for n, p in policies if _action(p) == ALLOW]
    if not allow:
        return AuthzDecision(True, None, f"allowed: no ALLOW policy applies to this workload{note}", audit)
    for name, pol in allow:
        hit = _policy_matches(pol, ctx, ALLOW)
        if hit is not None:
            return AuthzDecision(True, name, f"allowed by ALLOW policy {name} (rule {hit}){note}", audit)
    names = ", ".join(n for n, _ in allow)
    return AuthzDecision(False, None, f"denied: no ALLOW policy matched (checked {names}){note}", audit)


def custom_check(policies: Sequence[tuple[str, AuthorizationPolicy]], req: AuthzRequest) -> tuple[str, str] | None:
    """(provider name, policy name) of the first CUSTOM policy matching the request, or None."""
    ctx: _Context | None = None
    for name, pol in policies:
        if _action(pol) != CUSTOM:
            continue
        if ctx is None:
            ctx = _Context(req)
        if _policy_matches(pol, ctx, DENY) is not None:  # as a DENY: an attribute it cannot see matches
            return pol.provider.get("name", ""), name
    return None


def _action(p: AuthorizationPolicy) -> str:
    return (p.action or ALLOW).upper()


class _Context:
    """Request attributes, derived once per request."""

    __slots__ = ("req", "principal", "namespace", "path", "host", "headers")

    def __init__(self, req: AuthzRequest) -> None:
        self.req = req
        self.principal = _principal(req.source_principal)
        ns = req.source_namespace
        if ns is None and self.principal:
            parts = self.principal.split("/")
            if len(parts) >= 3 and parts[1] == "ns":
                ns = parts[2]
        self.namespace = ns or ""
        self.path = normalize_path(req.path)
        self.host = req.host.lower()
        hdrs: dict[str, list[str]] = {}
        for k, v in req.headers:
            hdrs.setdefault(k.lower(), []).append(v)
        self.headers = hdrs


def _principal(p: str | None) -> str:
    if not p:
        return ""
    return p[len("spiffe://"):] if p.startswith("spiffe://") else p


def _policy_matches(pol: AuthorizationPolicy, ctx: _Context, action: str) -> int | None:
    """Index of the first matching rule, or None."""
    for i, rule in enumerate(pol.rules or ()):
        if _rule_matches(rule, ctx, action):
            return i
    return None


def _rule_matches(rule: Rule, ctx: _Context, action: str) -> bool:
    if rule.from_ and not any(f.source is None or _source_matches(f.source, ctx, action) for f in rule.from_):
        return False
    if rule.to and not any(t.operation is None or _operation_matches(t.operation, ctx) for t in rule.to):
        return False
    return all(_condition_matches(c, ctx, action) for c in rule.when)


def _unsupported(action: str) -> bool:
    """What an attribute meshctl cannot evaluate counts as: never grants, always denies."""
    return action != ALLOW


def _field(values: Sequence[str], not_values: Sequence[str], test: Callable[[str], bool]) -> bool:
    if values and not any(test(v) for v in values):
        return False
    if not_values and any(test(v) for v in not_values):
        return False
    return True


def _source_matches(s: Source, ctx: _Context, action: str) -> bool:
    req = ctx.req
    if not _field(s.principals, s.not_principals, lambda v: string_match(_principal(v), ctx.principal)):
        return False
    if not _field(s.namespaces, s.not_namespaces, lambda v: string_match(v, ctx.namespace)):
        return False
    if not _field(s.ip_blocks, s.not_ip_blocks, lambda v: ip_in_block(req.source_ip, v)):
        return False
    remote = req.remote_ip or req.source_ip
    if not _field(s.remote_ip_blocks, s.not_remote_ip_blocks, lambda v: ip_in_block(remote, v)):
        return False
    if s.request_principals or s.not_request_principals:
        rp = req.auth.principal if req.auth is not None else ""
        if not _field(s.request_principals, s.not_request_principals, lambda v: string_match(v, rp)):
            return False
    return True


def _operation_matches(o: Operation, ctx: _Context) -> bool:
    req = ctx.req
    if not _field(o.methods, o.not_methods, lambda v: string_match(v, req.method)):
        return False
    if not _field(o.paths, o.not_paths, lambda v: path_match(v, ctx.path)):
        return False
    if not _field(o.hosts, o.not_hosts, lambda v: string_match(v.lower(), ctx.host)):
        return False
    if not _field(o.ports, o.not_ports, lambda v: v.strip() == str(req.port)):
        return False
    return True


_HEADER_KEY = re.compile(r"^request\.headers\[([^\]]+)\]$")


def _condition_matches(c: Condition, ctx: _Context, action: str) -> bool:
    req = ctx.req
    key = c.key.strip()
    m = _HEADER_KEY.match(key)
    if m:
        present = ctx.headers.get(m.group(1).lower())
        if present is None:
            return not c.values
        candidates = present + ([",".join(present)] if len(present) > 1 else [])
        return _field(c.values, c.not_values, lambda v: any(string_match(v, h) for h in candidates))
    if key == "source.ip":
        return _field(c.values, c.not_values, lambda v: ip_in_block(req.source_ip, v))
    if key == "remote.ip":
        remote = req.remote_ip or req.source_ip
        return _field(c.values, c.not_values, lambda v: ip_in_block(remote, v))
    if key == "destination.ip":
        if req.destination_ip is None:
            return _unsupported(action)
        return _field(c.values, c.not_values, lambda v: ip_in_block(req.destination_ip or "", v))
    if key == "source.namespace":
        return _field(c.values, c.not_values, lambda v: string_match(v, ctx.namespace))
    if key == "source.principal":
        return _field(c.values, c.not_values, lambda v: string_match(_principal(v), ctx.principal))
    if key == "destination.port":
        return _field(c.values, c.not_values, lambda v: v.strip() == str(req.port))
    if key == "connection.sni":
        return _field(c.values, c.not_values, lambda v: string_match(v, req.sni or ""))
    if key.startswith("request.auth."):
        vals = auth_values(req.auth, key)
        if vals is None:
            return _unsupported(action)
        return _field(c.values, c.not_values, lambda v: any(string_match(v, x) for x in vals))
    return _unsupported(action)


_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")


def auth_values(auth: RequestAuth | None, key: str) -> list[str] | None:
    """The values of a ``request.auth.*`` attribute ([] when absent), or None for an unknown key."""
    if key == "request.auth.principal":
        return [auth.principal] if auth is not None else []
    if key == "request.auth.audiences":
        return list(auth.audiences) if auth is not None else []
    if key == "request.auth.presenter":
        return [auth.presenter] if auth is not None and auth.presenter else []
    m = _CLAIM_KEY.match(key)
    if m is None:
        return None
    if auth is None:
        return []
    cur: object = auth.claims
    for part in m.group(1)[1:-1].split("]["):
        if not isinstance(cur, Mapping) or part not in cur:
            return []
        cur = cur[part]
    if isinstance(cur, list):
        return [_claim_str(x) for x in cur if isinstance(x, (str, int, float, bool))]
    if isinstance(cur, (str, int, float, bool)):
        return [_claim_str(cur)]
    return []


def _claim_str(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)  # request.auth.*, experimental.*, unknown keys


# ---------------------------------------------------------------- value matchers


def string_match(pattern: str, value: str) -> bool:
    """Istio's string match: ``*`` (present), ``prefix*``, ``*suffix``, exact."""
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def path_match(pattern: str, path: str) -> bool:
    if "{" in pattern:
        rx = _template_regex(pattern)
        return rx is not None and rx.fullmatch(path) is not None
    return string_match(pattern, path)


@lru_cache(maxsize=512)
def _template_regex(pattern: str) -> re.Pattern[str] | None:
    out = []
    for piece in re.split(r"(\{\*\*\}|\{\*\})", pattern):
        if piece == "{**}":
            out.append(r".*")
        elif piece == "{*}":
            out.append(r"[^/]+")
        elif "{" in piece or "}" in piece:
            return None  # not a valid template: matches nothing (validate_policy says why)
        else:
            out.append(re.escape(piece))
    return re.compile("".join(out))


def normalize_path(target: str) -> str:
    """The path without query or fragment, dot segments removed (RFC 3986 §5.2.4)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if "://" in path:  # absolute-form
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    if not path.startswith("/"):
        path = "/" + path
    if "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


@lru_cache(maxsize=1024)
def _network(block: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(block.strip(), strict=False)
    except ValueError:
        return None


def ip_in_block(ip: str, block: str) -> bool:
    net = _network(block)
    if net is None or not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped and net.version == 4:
        addr = addr.ipv4_mapped
    return addr.version == net.version and addr in net


# ---------------------------------------------------------------- validation


def validate_policy(pol: AuthorizationPolicy) -> list[str]:
    """Problems a user should hear about when the policy is applied: bad
    action, bad IP blocks and path templates, attributes meshctl cannot
    evaluate. Empty when the policy is fully supported."""
    problems: list[str] = []
    action = _action(pol)
    if action not in (ALLOW, DENY, AUDIT, CUSTOM):
        problems.append(f"action {pol.action!r} is not one of ALLOW, DENY, AUDIT, CUSTOM")
    effect = "never matches in an ALLOW policy" if action == ALLOW else "always matches in a DENY/AUDIT policy"
    for i, rule in enumerate(pol.rules or ()):
        where = f"rules[{i}]"
        for j, f in enumerate(rule.from_):
            s = f.source
            if s is None:
                continue
            for blk in (*s.ip_blocks, *s.not_ip_blocks, *s.remote_ip_blocks, *s.not_remote_ip_blocks):
                if _network(blk) is None:
                    problems.append(f"{where}.from[{j}]: {blk!r} is not an IP address or CIDR block")
        for j, t in enumerate(rule.to):
            o = t.operation
            if o is None:
                continue
            for p in (*o.paths, *o.not_paths):
                if "{" in p and _template_regex(p) is None:
                    problems.append(f"{where}.to[{j}]: path template {p!r} is invalid (use {{*}} or {{**}})")
            for port in (*o.ports, *o.not_ports):
                if not port.strip().isdigit():
                    problems.append(f"{where}.to[{j}]: port {port!r} is not a number")
        for j, c in enumerate(rule.when):
            if not condition_key_supported(c.key):
                problems.append(f"{where}.when[{j}]: key {c.key!r}: meshctl does not know this attribute; it {effect}")
            if not c.values and not c.not_values:
                problems.append(f"{where}.when[{j}]: key {c.key!r} has neither values nor notValues")
    return problems


def condition_key_supported(key: str) -> bool:
    """Whether meshctl evaluates this ``when`` key."""
    key = key.strip()
    if key.startswith("request.headers"):
        return _HEADER_KEY.match(key) is not None
    if key.startswith("request.auth.claims"):
        return _CLAIM_KEY.match(key) is not None
    return key in _EXACT_KEYS


_EXACT_KEYS = frozenset({
    "source.ip", "remote.ip", "source.namespace", "source.principal", "destination.ip", "destination.port",
    "connection.sni",
    "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
})
