"""ProxyConfig: everything one sidecar or gateway needs, as plain data.

Pilot compiles (Istio resources + registry endpoints + mesh settings) into
one ProxyConfig per proxy; `meshctl proxy run --config FILE` reads the same
shape from YAML/JSON (see docs/proxyconfig.md). A proxy never interprets
Istio resources beyond what is here: hosts are already fully qualified,
destinations already name a port, clusters already carry their endpoints
and their merged traffic policy.

Shape (Envoy's, simplified):

    listeners ──(route_table)──▶ route_tables[name].virtual_hosts[].routes[]
                                   route destination ──▶ clusters[name].endpoints
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import EMPTY, Duration, FrozenDict
from .istio import AuthorizationPolicy, HTTPRoute, RequestAuthentication, TCPRoute, TLSRoute, TrafficPolicy
from .ratelimit import RateLimit
from .telemetry_api import TelemetryPolicy

DEFAULT_NAMESPACE = "default"
DEFAULT_DOMAIN_SUFFIX = "svc.cluster.local"


def fqdn(host: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """Istio's short-name expansion: ``reviews`` → ``reviews.default.svc.cluster.local``.

    Names with a dot that are not already in the cluster domain are taken as
    given (``reviews.prod`` → ``reviews.prod.svc.cluster.local``; a
    ServiceEntry host like ``httpbin.org`` is left alone when it has 2+ dots
    or a TLD, which pilot decides with the registry in hand).
    """
    if "." not in host:
        return f"{host}.{namespace}.{DEFAULT_DOMAIN_SUFFIX}"
    if host.count(".") == 1 and not host.endswith("." + DEFAULT_DOMAIN_SUFFIX):
        name, ns = host.split(".")
        return f"{name}.{ns}.{DEFAULT_DOMAIN_SUFFIX}"
    return host


def cluster_name(host: str, port: int, subset: str | None = None, direction: str = "outbound") -> str:
    """Envoy/Istio's cluster naming: ``outbound|9080|v1|reviews.default.svc.cluster.local``."""
    return f"{direction}|{port}|{subset or ''}|{host}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    labels: FrozenDict[str, str] = EMPTY
    instance: str = ""  # registry instance id (workload instance name)
    weight: int = 1
    health: str = "HEALTHY"  # HEALTHY | UNHEALTHY | DRAINING
    identity: str | None = None  # expected SPIFFE ID of the peer sidecar (mTLS)
    locality: str = ""  # region/zone/subzone where it runs ("": unknown), for locality load balancing


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str  # cluster_name(...)
    service: str  # FQDN
    port: int
    subset: str | None = None
    protocol: str = "http"  # http | http2 | grpc | tcp
    traffic_policy: TrafficPolicy | None = None  # DR top level ⊕ subset ⊕ port level, merged
    endpoints: tuple[Endpoint, ...] = ()
    external: bool = False  # outside the mesh (a MESH_EXTERNAL ServiceEntry): no x-meshctl-* headers go there
    original_destination: bool = False  # no endpoints: connect to the host the request names (ServiceEntry NONE)
    # endpoints given by name (ServiceEntry resolution): "DNS" spreads requests over every address
    # the name resolves to, "DNS_ROUND_ROBIN" uses the first address of the latest answer (proxy/dns.py)
    dns: str = ""
    addresses: tuple[str, ...] = ()  # a ServiceEntry's addresses (IPs, CIDRs): CONNECT to one reaches this cluster
    subject_alt_names: tuple[str, ...] = ()  # a ServiceEntry's: the names an endpoint's certificate must carry one of


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str  # "reviews.default.svc.cluster.local:9080"
    domains: tuple[str, ...]  # every authority it answers to: "reviews", "reviews:9080", FQDN, ...
    routes: tuple[HTTPRoute, ...] = ()  # destination hosts are FQDNs and carry a port
    # IP ranges (CIDR, a ServiceEntry's addresses) whose addresses it answers to as authority,
    # with the port in ``port`` (core/route.py); exact IPs are in ``domains``
    subnets: tuple[str, ...] = ()
    port: int | None = None


@dataclass(frozen=True, slots=True)
class RouteTable:
    name: str  # "outbound", "gateway-8080", ...
    virtual_hosts: tuple[VirtualHost, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """One TLS server of a Gateway on a gateway listener's port (Istio's Server
    with ``tls``), chosen per connection by the SNI the client sends.

    Credentials are named, never carried: ``credential_name`` is a secret of
    `meshctl secret create tls` that the proxy reads from its state directory;
    ``server_certificate``/``private_key``/``ca_certificates`` are file paths."""

    name: str  # "default/mygateway servers[0]", for logs and errors
    hosts: tuple[str, ...] = ("*",)  # SNI names it answers: exact, "*.example.com" or "*"
    mode: str = "SIMPLE"  # SIMPLE MUTUAL OPTIONAL_MUTUAL PASSTHROUGH ISTIO_MUTUAL
    protocol: str = "http"  # what runs inside once terminated: http | tcp (PASSTHROUGH: tcp, untouched)
    credential_name: str | None = None
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    subject_alt_names: tuple[str, ...] = ()  # MUTUAL: accepted client certificate SANs (empty: any)
    min_protocol_version: str | None = None  # TLSV1_0 .. TLSV1_3 (TLS_AUTO: default)
    max_protocol_version: str | None = None
    cipher_suites: tuple[str, ...] = ()  # OpenSSL names, TLS 1.2 and below
    tcp_routes: tuple[TCPRoute, ...] = ()  # protocol tcp: where the bytes go
    tls_routes: tuple[TLSRoute, ...] = ()  # PASSTHROUGH: VirtualService tls: routes, chosen by SNI


@dataclass(frozen=True, slots=True)
class Listener:
    """A socket the proxy binds, and what it does with what arrives.

    direction:
      outbound  HTTP proxy for the app (HTTP_PROXY points here): absolute-form
                targets routed by authority through ``route_table``.
      binding   an upstream binding: 127.0.0.1:PORT is ``service``:``service_port``;
                protocol http routes through ``route_table`` as if the
                authority were the service, tcp goes through ``tcp_routes``
                (or straight to the service's cluster when there are none).
      inbound   the address registered for the workload; forwards to the app
                at ``app_address``:``app_port``.
      gateway   ingress: routes through ``route_table``, bound VirtualServices only.
    """

    name: str
    direction: str
    address: str
    port: int
    protocol: str = "http"  # http (HTTP/1.1, and HTTP/2 where detected) | tcp
    route_table: str | None = None
    service: str | None = None
    service_port: int | None = None
    tcp_routes: tuple[TCPRoute, ...] = ()
    app_address: str | None = None
    app_port: int | None = None
    mtls_mode: str = "DISABLE"  # inbound: STRICT | PERMISSIVE | DISABLE
    trusted_proxies: int = 0  # gateway: proxies in front whose x-forwarded-for is trusted (numTrustedProxies)
    tls_servers: tuple[ServerTLS, ...] = ()  # gateway: TLS on this port (then never plaintext)
    https_redirect: tuple[str, ...] = ()  # gateway: hosts answered with a 301 to https://


@dataclass(frozen=True, slots=True)
class Workload:
    name: str  # instance name, e.g. "reviews-v2-0"
    service: str  # short service name, "reviews"
    namespace: str = DEFAULT_NAMESPACE
    labels: FrozenDict[str, str] = EMPTY  # app, version, ...
    service_account: str | None = None  # defaults to the service name
    trust_domain: str = "cluster.local"
    locality: str = ""  # region/zone/subzone (mesh.yaml settings.locality or versions[].locality)

    @property
    def spiffe_id(self) -> str:
        sa = self.service_account or self.service
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{sa}"


@dataclass(frozen=True, slots=True)
class ExtAuthzBody:
    max_request_bytes: int | None = None
    allow_partial_message: bool | None = None
    pack_as_bytes: bool | None = None


@dataclass(frozen=True, slots=True)
class EnvoyExtAuthzHttp:
    """Istio's meshConfig extensionProviders[].envoyExtAuthzHttp: an HTTP authorization
    service (Envoy's ext_authz HTTP contract) for AuthorizationPolicy action CUSTOM."""

    service: str = ""  # host name or address the proxies reach it at
    port: int = 0
    timeout: Duration | None = None  # Istio's default 600s
    path_prefix: str | None = None
    fail_open: bool = False
    status_on_error: str | None = None  # default 403
    include_request_headers_in_check: tuple[str, ...] = ()  # exact, prefix*, *suffix
    include_additional_headers_in_check: FrozenDict[str, str] = EMPTY
    headers_to_upstream_on_allow: tuple[str, ...] = ()
    headers_to_downstream_on_deny: tuple[str, ...] = ()
    headers_to_downstream_on_allow: tuple[str, ...] = ()  # refused by name (settings_problems)
    include_request_body_in_check: ExtAuthzBody | None = None  # refused by name (settings_problems)


@dataclass(frozen=True, slots=True)
class ExtensionProvider:
    name: str = ""
    envoy_ext_authz_http: EnvoyExtAuthzHttp | None = None


@dataclass(frozen=True, slots=True)
class Node:
    """What a proxy tells Pilot (pilot/compile.py compiles it into a ProxyConfig) about itself: who it is and which sockets it has.

    Listeners come without route tables; Pilot fills those in. A gateway
    node has ``gateway_ports``: Gateway server port → the listener that
    serves it (a laptop can't bind 80, so `up` maps 80 → 8080 and so on).
    """

    workload: Workload
    listeners: tuple[Listener, ...] = ()
    gateway: bool = False
    settings: Settings | None = None  # from mesh.yaml (supervisor/plan.proxy_settings); None: Pilot's


@dataclass(frozen=True, slots=True)
class Settings:
    """Limits and timeouts; defaults follow Envoy's and Istio's where they have one."""

    max_request_headers_kb: int = 60
    max_headers: int = 100
    request_headers_timeout: Duration = Duration(10.0)
    idle_timeout: Duration = Duration(300.0)
    connect_timeout: Duration = Duration(10.0)
    drain_timeout: Duration = Duration(5.0)
    # hardening (issue 13): Istio meshConfig pathNormalization; upgrades passed to
    # the app (Envoy upgrade_configs; h2c never); Envoy request_timeout (whole
    # request received, 0 = none); connections per listener (0: from RLIMIT_NOFILE);
    # time a draining proxy keeps serving (Istio terminationDrainDuration)
    path_normalization: str = "BASE"  # NONE | BASE | MERGE_SLASHES | DECODE_AND_MERGE_SLASHES
    upgrade_types: tuple[str, ...] = ("websocket",)
    request_timeout: Duration = Duration(300.0)
    max_connections: int = 0
    # 0 for a standalone proxy; `meshctl up` passes mesh.yaml's settings.drainDuration (5s)
    drain_duration: Duration = Duration(0.0)
    retry_buffer_bytes: int = 64 * 1024  # a body larger than this is not retried
    # Istio meshConfig.outboundTrafficPolicy.mode: hosts the mesh does not know pass
    # through (ALLOW_ANY) or get 502 (REGISTRY_ONLY); see proxy/egress.py
    outbound_traffic_policy: str = "ALLOW_ANY"
    # Istio meshConfig extensionProviders: external authorizers for AuthorizationPolicy CUSTOM
    extension_providers: tuple[ExtensionProvider, ...] = ()
    # distributed tracing (proxy/tracing.py): Zipkin collector "zipkin://host:port" ("" = off)
    # and the percentage of requests sampled where no caller decided (Istio's default 1 %)
    tracing_zipkin: str = ""
    # OpenTelemetry collector, OTLP/HTTP: "http(s)://host:port" (POSTs to /v1/traces),
    # a full ".../v1/traces" URL, or "otlp://host:port" (= http://host:port); "" = off
    tracing_otlp: str = ""
    tracing_sampling: float = 1.0
    # Istio's default retry policy where a route sets none.
    default_retry_attempts: int = 2
    default_retry_on: str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    # local users besides the proxy's own who may use its outbound listener and bindings
    # (they send with the workload's identity): user names or uids (core/peeruid.py)
    outbound_users: tuple[str, ...] = ()  # mesh.yaml's numbers arrive as digits


PATH_NORMALIZATIONS = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")  # Istio meshConfig
UPGRADE_TYPES = ("websocket", "connect-udp", "connect-ip")  # what may be relayed after a 101
OUTBOUND_TRAFFIC_POLICIES = ("ALLOW_ANY", "REGISTRY_ONLY")  # Istio meshConfig.outboundTrafficPolicy.mode


def _zipkin_address(url: str) -> tuple[str, int] | None:
    """(host, port) of "zipkin://HOST:PORT", None when malformed."""
    if not url.startswith("zipkin://"):
        return None
    host, sep, port = url[len("zipkin://"):].rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host.strip("[]"), int(port)


def _otlp_url(url: str) -> str | None:
    """The OTLP/HTTP traces endpoint of a ``tracing.otlp`` setting, None when malformed.

    As OpenTelemetry's exporters read OTEL_EXPORTER_OTLP_ENDPOINT: a base URL
    ``http://host:4318`` gets the signal path ``/v1/traces`` appended; a URL with
    a path is used as it is (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). ``otlp://host:port``
    is short for ``http://host:port``."""
    if url.startswith("otlp://"):
        url = "http://" + url[len("otlp://"):]
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        return None
    hostport, slash, path = rest.partition("/")
    host, colon, port = hostport.rpartition(":")
    if not hostport or (colon and (not host or not port.isdigit() or not 1 <= int(port) <= 65535)):
        return None
    if not colon and not hostport.strip("[]"):
        return None
    path = path.rstrip("/")
    return f"{scheme}://{hostport}/{path}" if path else f"{scheme}://{hostport}/v1/traces"


MAX_UID = 4294967294  # (uid_t)-1 means "no user"


def outbound_user_problem(entry: Any) -> str | None:
    """What is wrong with one ``outboundUsers`` entry, syntactically (names are
    resolved by core/peeruid.resolve_users): a user name, or a uid as a number or digits."""
    if isinstance(entry, bool) or not isinstance(entry, (int, str)):
        return f"{entry!r} is neither a user name nor a uid"
    if isinstance(entry, int) or entry.isdigit():
        if not 0 <= int(entry) <= MAX_UID:
            return f"uid {entry} is out of range (0-{MAX_UID})"
        return None
    if not entry or entry != entry.strip() or ":" in entry or "/" in entry:
        return f"{entry!r} is not a user name"
    return None


def settings_problems(s: Settings) -> list[tuple[str, str]]:
    """(field, message) for the hardening settings a proxy cannot carry out."""
    out: list[tuple[str, str]] = []
    if s.path_normalization not in PATH_NORMALIZATIONS:
        out.append(("pathNormalization", f"{s.path_normalization!r} is not one of {', '.join(PATH_NORMALIZATIONS)}"))
    for i, t in enumerate(s.upgrade_types):
        if t.lower() == "h2c":
            out.append((f"upgradeTypes[{i}]", "h2c is never relayed: it would tunnel requests past routing and "
                        "authorization (Envoy strips it too)"))
        elif t.lower() not in UPGRADE_TYPES:
            out.append((f"upgradeTypes[{i}]", f"{t!r}: meshctl relays only {', '.join(UPGRADE_TYPES)}"))
    if s.outbound_traffic_policy not in OUTBOUND_TRAFFIC_POLICIES:
        out.append(("outboundTrafficPolicy", f"{s.outbound_traffic_policy!r} is not one of {', '.join(OUTBOUND_TRAFFIC_POLICIES)}"))
    names: set[str] = set()
    for i, p in enumerate(s.extension_providers):
        where = f"extensionProviders[{i}]"
        if not p.name:
            out.append((f"{where}.name", "name is required"))
        elif p.name in names:
            out.append((f"{where}.name", f"provider {p.name!r} is defined twice"))
        names.add(p.name)
        e = p.envoy_ext_authz_http
        if e is None:
            out.append((where, "envoyExtAuthzHttp is required (meshctl implements only HTTP external authorizers)"))
            continue
        if not e.service:
            out.append((f"{where}.envoyExtAuthzHttp.service", "service is required"))
        elif e.service.endswith(".svc.cluster.local") or e.service.endswith(".svc"):
            out.append((f"{where}.envoyExtAuthzHttp.service",
                        f"meshctl does not implement reaching the authorizer as a mesh service ({e.service}) yet: "
                        "give the host name or address it listens on"))
        if not 1 <= e.port <= 65535:
            out.append((f"{where}.envoyExtAuthzHttp.port", "port 1-65535 is required"))
        if e.headers_to_downstream_on_allow:
            out.append((f"{where}.envoyExtAuthzHttp.headersToDownstreamOnAllow",
                        "meshctl does not implement headersToDownstreamOnAllow yet"))
        if e.include_request_body_in_check is not None:
            out.append((f"{where}.envoyExtAuthzHttp.includeRequestBodyInCheck",
                        "meshctl does not implement includeRequestBodyInCheck yet"))
        if e.status_on_error is not None and not (e.status_on_error.isdigit() and 200 <= int(e.status_on_error) <= 599):
            out.append((f"{where}.envoyExtAuthzHttp.statusOnError", f"{e.status_on_error!r} is not an HTTP status"))
    if s.tracing_zipkin and not _zipkin_address(s.tracing_zipkin):
        out.append(("tracing.zipkin", f"{s.tracing_zipkin!r} is not zipkin://HOST:PORT (Zipkin's v2 HTTP API; "
                    "an OpenTelemetry collector goes in tracing.otlp)"))
    if s.tracing_otlp and not _otlp_url(s.tracing_otlp):
        out.append(("tracing.otlp", f"{s.tracing_otlp!r} is not an OTLP/HTTP endpoint: http(s)://HOST:PORT "
                    "(spans go to /v1/traces), a full .../v1/traces URL, or otlp://HOST:PORT"))
    if not 0.0 <= s.tracing_sampling <= 100.0:
        out.append(("tracing.sampling", f"{s.tracing_sampling} is not a percentage between 0 and 100"))
    for i, u in enumerate(s.outbound_users):
        if (why := outbound_user_problem(u)) is not None:
            out.append((f"outboundUsers[{i}]", why))
    if s.max_connections < 0:
        out.append(("maxConnections", "must be >= 0 (0: derived from the open-file limit)"))
    for name in ("request_timeout", "drain_duration"):
        if float(getattr(s, name)) < 0:
            camel = name.split("_")[0] + "".join(w.title() for w in name.split("_")[1:])
            out.append((camel, "must not be negative"))
    return out


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    version: str
    workload: Workload
    listeners: tuple[Listener, ...] = ()
    route_tables: FrozenDict[str, RouteTable] = EMPTY
    clusters: FrozenDict[str, Cluster] = EMPTY
    # inbound: the AuthorizationPolicies that select this workload, by "namespace/name"
    authorization: FrozenDict[str, AuthorizationPolicy] = EMPTY
    # inbound: the meshctl RateLimits that select this workload, by "namespace/name"
    rate_limits: FrozenDict[str, RateLimit] = EMPTY
    # Istio Telemetry resources that reach this workload, merged (pilot/telemetry.py)
    telemetry: TelemetryPolicy = TelemetryPolicy()
    # the RequestAuthentications that select this workload, by "namespace/name", and the
    # JWKS documents Pilot fetched for their jwksUris (uri → JSON text; last good set kept)
    request_authentication: FrozenDict[str, RequestAuthentication] = EMPTY
    jwks: FrozenDict[str, str] = EMPTY
    settings: Settings = field(default_factory=Settings)
