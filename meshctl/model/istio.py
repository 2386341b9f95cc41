"""Istio resources as frozen dataclasses.

Every class mirrors a message of Istio's public API (networking.istio.io and
security.istio.io, v1 / v1beta1 / v1alpha3 share the same fields): the field
names are Istio's camelCase names in snake_case, lists are tuples, maps are
FrozenDicts, durations are ``Duration`` (seconds). ``None`` means "not set",
which matters: Istio distinguishes an unset timeout from a zero one.

Only ``loader/`` knows YAML; only ``core/`` and ``pilot/`` give these meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import EMPTY, Duration, FrozenDict

# ---------------------------------------------------------------- common


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Exactly one of exact / prefix / regex is set (regex is RE2 syntax, full match)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True)
class Percent:
    value: float = 0.0


@dataclass(frozen=True, slots=True)
class PortSelector:
    number: int | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    host: str = ""
    subset: str | None = None
    port: PortSelector | None = None


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    match_labels: FrozenDict[str, str] = EMPTY


# ---------------------------------------------------------------- VirtualService


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: FrozenDict[str, str] = EMPTY
    add: FrozenDict[str, str] = EMPTY
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: FrozenDict[str, StringMatch] = EMPTY
    port: int | None = None
    source_labels: FrozenDict[str, str] = EMPTY
    gateways: tuple[str, ...] = ()
    query_params: FrozenDict[str, StringMatch] = EMPTY
    ignore_uri_case: bool = False
    without_headers: FrozenDict[str, StringMatch] = EMPTY
    source_namespace: str | None = None
    stat_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination = field(default_factory=Destination)
    weight: int | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    match: str = ""
    rewrite: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    derive_port: str | None = None  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: str | None = None
    redirect_code: int | None = None  # default 301


@dataclass(frozen=True, slots=True)
class HTTPBody:
    string: str | None = None
    bytes: str | None = None  # base64, as in Istio's JSON form


@dataclass(frozen=True, slots=True)
class HTTPDirectResponse:
    status: int = 200
    body: HTTPBody | None = None


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int = 0
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: Duration | None = None
    percentage: Percent | None = None
    percent: int | None = None  # deprecated, still accepted


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: str | None = None
    percentage: Percent | None = None
    percent: int | None = None  # deprecated, still accepted (Bookinfo's ratings-test-abort uses it)


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None


@dataclass(frozen=True, slots=True)
class HTTPMirrorPolicy:
    destination: Destination = field(default_factory=Destination)
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True)
class Delegate:
    """A root VirtualService's HTTP route hands the requests it matches to the routes
    of another VirtualService (one without hosts): pilot/delegate.py merges them."""

    name: str = ""
    namespace: str | None = None  # default: the root's


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirror_percentage: Percent | None = None
    mirror_percent: int | None = None  # deprecated, still accepted
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None
    delegate: Delegate | None = None


@dataclass(frozen=True, slots=True)
class L4MatchAttributes:
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: FrozenDict[str, str] = EMPTY
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination = field(default_factory=Destination)
    weight: int | None = None


@dataclass(frozen=True, slots=True)
class TCPRoute:
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class TLSMatchAttributes:
    sni_hosts: tuple[str, ...] = ()
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: FrozenDict[str, str] = EMPTY
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class TLSRoute:
    match: tuple[TLSMatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualService:
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# ---------------------------------------------------------------- DestinationRule


@dataclass(frozen=True, slots=True)
class HTTPCookie:
    name: str = ""
    path: str | None = None
    ttl: Duration | None = None


@dataclass(frozen=True, slots=True)
class RingHash:
    minimum_ring_size: int | None = None


@dataclass(frozen=True, slots=True)
class Maglev:
    table_size: int | None = None


@dataclass(frozen=True, slots=True)
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: Maglev | None = None
    minimum_ring_size: int | None = None  # deprecated


@dataclass(frozen=True, slots=True)
class LocalityDistribute:
    from_: str = ""  # "from" in YAML: region/zone/subzone of the caller, "*" wildcards
    to: FrozenDict[str, int] = EMPTY  # locality (wildcards) → share of traffic, summing to 100


@dataclass(frozen=True, slots=True)
class LocalityFailover:
    from_: str = ""  # "from" in YAML: a region
    to: str = ""  # the region to fail over to


@dataclass(frozen=True, slots=True)
class LocalityLoadBalancerSetting:
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[str, ...] = ()  # labels, "label=value" to override the caller's value
    enabled: bool | None = None


@dataclass(frozen=True, slots=True)
class WarmupConfiguration:
    duration: Duration | None = None
    minimum_percent: float | None = None  # default 10
    aggression: float | None = None  # default 1.0


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    simple: str | None = None  # UNSPECIFIED LEAST_CONN RANDOM PASSTHROUGH ROUND_ROBIN LEAST_REQUEST
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: Duration | None = None
    warmup: WarmupConfiguration | None = None


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    probes: int | None = None
    time: Duration | None = None
    interval: Duration | None = None


@dataclass(frozen=True, slots=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: str | None = None  # DEFAULT DO_NOT_UPGRADE UPGRADE
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_5xx_errors: int | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None
    consecutive_errors: int | None = None  # deprecated, still accepted


@dataclass(frozen=True, slots=True)
class ClientTLSSettings:
    mode: str | None = None  # DISABLE SIMPLE MUTUAL ISTIO_MUTUAL
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None


@dataclass(frozen=True, slots=True)
class PortTrafficPolicy:
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()


@dataclass(frozen=True, slots=True)
class Subset:
    name: str = ""
    labels: FrozenDict[str, str] = EMPTY
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    host: str = ""
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: WorkloadSelector | None = None


# ---------------------------------------------------------------- ServiceEntry, Gateway


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int = 0
    protocol: str | None = None  # HTTP HTTPS HTTP2 GRPC TCP TLS MONGO ...
    name: str | None = None
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    address: str = ""
    ports: FrozenDict[str, int] = EMPTY
    labels: FrozenDict[str, str] = EMPTY
    network: str | None = None
    locality: str | None = None
    weight: int | None = None
    service_account: str | None = None


@dataclass(frozen=True, slots=True)
class WorkloadGroupMetadata:
    labels: FrozenDict[str, str] = EMPTY
    annotations: FrozenDict[str, str] = EMPTY


@dataclass(frozen=True, slots=True)
class WorkloadGroup:
    """Istio's template for workloads that join on their own (VMs): here, the instances a
    registry delivers with the label ``workload-group: <name>`` (pilot/compile.py)."""

    metadata: WorkloadGroupMetadata | None = None
    template: WorkloadEntry | None = None


@dataclass(frozen=True, slots=True)
class EntryWorkloadSelector:
    """ServiceEntry's workloadSelector: ``labels`` (not ``matchLabels`` as elsewhere)."""

    labels: FrozenDict[str, str] = EMPTY


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    hosts: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: str | None = None  # MESH_EXTERNAL MESH_INTERNAL
    resolution: str | None = None  # NONE STATIC DNS DNS_ROUND_ROBIN
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: EntryWorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IstioEgressListener:
    hosts: tuple[str, ...] = ()  # "namespace/dnsName": which services the workload's proxy knows


@dataclass(frozen=True, slots=True)
class SidecarPort:
    number: int = 0
    protocol: str | None = None
    name: str | None = None
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class IstioIngressListener:
    """An inbound listener of the workload's sidecar (pilot/compile.py ``ingress_listeners``)."""

    port: SidecarPort = field(default_factory=SidecarPort)
    bind: str | None = None
    capture_mode: str | None = None  # DEFAULT | IPTABLES | NONE
    default_endpoint: str | None = None  # 127.0.0.1:PORT | 0.0.0.0:PORT | unix:///path
    tls: ServerTLSSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None


@dataclass(frozen=True, slots=True)
class OutboundTrafficPolicy:
    mode: str | None = None  # ALLOW_ANY | REGISTRY_ONLY


@dataclass(frozen=True, slots=True)
class Sidecar:
    workload_selector: EntryWorkloadSelector | None = None
    ingress: tuple["IstioIngressListener", ...] = ()
    egress: tuple[IstioEgressListener, ...] = ()
    outbound_traffic_policy: OutboundTrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class ServerTLSSettings:
    https_redirect: bool | None = None
    mode: str | None = None  # PASSTHROUGH SIMPLE MUTUAL AUTO_PASSTHROUGH ISTIO_MUTUAL OPTIONAL_MUTUAL
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    min_protocol_version: str | None = None
    max_protocol_version: str | None = None
    cipher_suites: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Port:
    number: int = 0
    protocol: str = ""
    name: str | None = None
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class Server:
    port: Port = field(default_factory=Port)
    bind: str | None = None
    hosts: tuple[str, ...] = ()
    tls: ServerTLSSettings | None = None
    name: str | None = None
    default_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class Gateway:
    servers: tuple[Server, ...] = ()
    selector: FrozenDict[str, str] = EMPTY


# ---------------------------------------------------------------- security.istio.io


@dataclass(frozen=True, slots=True)
class PeerAuthenticationMTLS:
    mode: str | None = None  # UNSET DISABLE PERMISSIVE STRICT


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    selector: WorkloadSelector | None = None
    mtls: PeerAuthenticationMTLS | None = None
    port_level_mtls: FrozenDict[int, PeerAuthenticationMTLS] = EMPTY


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleFrom:
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class RuleTo:
    operation: Operation | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    key: str = ""
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    from_: tuple[RuleFrom, ...] = ()  # "from" in YAML
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    selector: WorkloadSelector | None = None
    action: str | None = None  # ALLOW (default) DENY AUDIT CUSTOM
    rules: tuple[Rule, ...] | None = None  # None: no rules field; () : "rules: []"
    provider: FrozenDict[str, str] = EMPTY


@dataclass(frozen=True, slots=True)
class JWTHeader:
    name: str = ""
    prefix: str | None = None  # e.g. "Bearer "; stripped from the value


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str = ""
    claim: str = ""  # top-level claim; "a.b" for a nested one


@dataclass(frozen=True, slots=True)
class JWTRule:
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None  # inline JWKS (JSON text)
    from_headers: tuple[JWTHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    forward_original_token: bool = False
    timeout: Duration | None = None  # jwksUri fetch timeout (Istio's default 5s)
    presence: str | None = None  # OPTIONAL (default): no token passes | REQUIRED: 401 "Jwt is missing"
    space_delimited_claims: tuple[str, ...] = ()  # matched as lists by AuthorizationPolicy (scope, permission always)


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    selector: WorkloadSelector | None = None
    jwt_rules: tuple[JWTRule, ...] = ()


# ---------------------------------------------------------------- the envelope


SPEC_TYPES: dict[tuple[str, str], type] = {
    ("networking.istio.io", "VirtualService"): VirtualService,
    ("networking.istio.io", "DestinationRule"): DestinationRule,
    ("networking.istio.io", "ServiceEntry"): ServiceEntry,
    ("networking.istio.io", "Gateway"): Gateway,
    ("networking.istio.io", "WorkloadEntry"): WorkloadEntry,
    ("networking.istio.io", "WorkloadGroup"): WorkloadGroup,
    ("networking.istio.io", "Sidecar"): Sidecar,
    ("security.istio.io", "PeerAuthentication"): PeerAuthentication,
    ("security.istio.io", "AuthorizationPolicy"): AuthorizationPolicy,
    ("security.istio.io", "RequestAuthentication"): RequestAuthentication,
}
"""(API group, kind) → spec class. meshctl's own kinds (rate limits, ...) are
added to this table by the modules that define them, in the group
``meshctl.io``."""

API_VERSIONS: dict[str, tuple[str, ...]] = {
    "networking.istio.io": ("v1", "v1beta1", "v1alpha3"),
    "security.istio.io": ("v1", "v1beta1"),
    "meshctl.io": ("v1alpha1",),
}


@dataclass(frozen=True, slots=True)
class Resource:
    """One applied object: Kubernetes-style envelope around an Istio spec."""

    api_version: str
    kind: str
    name: str
    namespace: str
    spec: object
    labels: FrozenDict[str, str] = EMPTY
    source: str | None = None  # "file.yaml:12", where it was read from

    @property
    def group(self) -> str:
        return self.api_version.split("/", 1)[0]

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity for apply/replace: kind, namespace, name."""
        return (self.kind, self.namespace, self.name)
