"""mesh.yaml: the services on this host, and how `meshctl up` runs them.

```yaml
settings:
  registry: embedded            # or consul://127.0.0.1:8500, eureka://127.0.0.1:8761/eureka
  trustDomain: cluster.local
  namespace: default            # the workloads' namespace: their identities (ns/<namespace>) and the
                                # PeerAuthentication/AuthorizationPolicy that apply (services stay *.default)
  meshId: shop                  # with Consul: the rules live in Consul KV under meshctl/<meshId>/, shared by
                                # every host with this meshId (default: trustDomain)
  portRange: 21000-21999        # where meshctl allocates app, sidecar and gateway ports
  readyTimeout: 60s             # how long `up` waits for every instance to pass its health check
  advertise: 10.0.0.12          # across hosts: this host's address, registered for its instances and where
                                # their (mTLS) inbound listeners listen; default 127.0.0.1 (one host)
  pathNormalization: BASE       # NONE | BASE | MERGE_SLASHES | DECODE_AND_MERGE_SLASHES (Istio's)
  drainDuration: 5s             # a stopping sidecar keeps serving this long while callers move away
  outboundUsers: [alice, 1001]  # local users besides the mesh's own who may use the sidecars' outbound
                                # listeners and bindings (they send with the workload's identity)
  locality: us-east/zone-a      # region/zone/subzone of this host's workloads (`up --locality` overrides);
                                # DestinationRule localityLbSetting balances by it
  tracing:                      # distributed tracing from every sidecar and gateway
    zipkin: zipkin://127.0.0.1:9411   # Zipkin's v2 API (spans sent in batches)
    otlp: http://127.0.0.1:4318       # and/or an OpenTelemetry collector, OTLP/HTTP (POST /v1/traces)
    sampling: 1.0               # % of requests traced where no caller decided (Istio's default 1 %)
services:
- name: reviews
  port: 9080                    # the service port clients use: http://reviews:9080/
  upstreams: {ratings: 9091}    # 127.0.0.1:9091 in the app's sidecar reaches ratings (RATINGS_ADDR)
  serviceAccount: bookinfo-reviews  # identity spiffe://<trustDomain>/ns/<namespace>/sa/<this>; default: the name
  healthCheck: {http: /health, interval: 2s}
  versions:
  - name: v2
    labels: {version: v2}
    command: [python3, apps/reviews.py]
    env: {SERVICE_VERSION: v2}
    replicas: 1
    locality: us-east/zone-b    # region/zone/subzone of these instances (default: settings.locality)
gateways:
- name: istio-ingressgateway
  labels: {istio: ingressgateway}
  ports: {80: 8080}             # Gateway server port 80 is served on host port 8080
  numTrustedProxies: 0          # x-forwarded-for hops to trust for remoteIpBlocks (Istio's gatewayTopology)
  address: 127.0.0.1            # where its ports listen: 0.0.0.0 or the host's address serves other machines
```

Field names follow the house convention (camelCase in YAML, snake_case here),
so the reflective loader reads this file with file:line errors like rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import EMPTY, Duration, FrozenDict
from .proxyconfig import ExtensionProvider


@dataclass(frozen=True, slots=True)
class HealthCheck:
    http: str | None = None  # path, e.g. /health; GET must answer 2xx/3xx
    tcp: bool | None = None  # a TCP connect is enough
    interval: Duration = Duration(2.0)
    timeout: Duration = Duration(1.0)
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3


@dataclass(frozen=True, slots=True)
class Version:
    name: str = "v1"
    labels: FrozenDict[str, str] = EMPTY  # `app: <service>` and `version: <name>` are added
    command: tuple[str, ...] = ()  # argv; the app gets PORT, HTTP_PROXY, <SVC>_ADDR in its env
    address: str | None = None  # an app already running: "127.0.0.1:9080" (then no command)
    replicas: int = 1
    env: FrozenDict[str, str] = EMPTY
    locality: str | None = None  # region/zone/subzone of these instances; default: settings.locality


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str = ""
    port: int = 80
    protocol: str = "http"  # http | http2 | grpc | tcp
    versions: tuple[Version, ...] = ()
    upstreams: FrozenDict[str, int] = EMPTY  # service → local port of a binding
    health_check: HealthCheck | None = None
    env: FrozenDict[str, str] = EMPTY
    cwd: str | None = None  # working directory of the apps (default: the mesh file's folder)
    service_account: str | None = None  # Istio's service account; default: the service name


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    name: str = ""
    labels: FrozenDict[str, str] = EMPTY
    ports: FrozenDict[int, int] = EMPTY  # Gateway server port → host port
    replicas: int = 1
    num_trusted_proxies: int = 0  # Istio's gatewayTopology.numTrustedProxies: x-forwarded-for hops to trust
    # where the gateway's ports listen: 127.0.0.1 (this machine only), this host's address,
    # or 0.0.0.0 (every address) to take traffic from other machines (docs/multi-host.md)
    address: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    zipkin: str = ""  # zipkin://HOST:PORT
    otlp: str = ""  # http(s)://HOST:PORT (OTLP/HTTP, /v1/traces appended), a full URL, or otlp://HOST:PORT
    sampling: float = 1.0  # percent, as Istio's meshConfig defaultConfig.tracing.sampling


@dataclass(frozen=True, slots=True)
class MeshSettings:
    registry: str = "embedded"
    trust_domain: str = "cluster.local"
    # Istio's meshConfig meshId; with a Consul registry the rules live under meshctl/<meshId>/ in
    # Consul KV (pilot/kvstore.py), shared by every host with the same meshId. Default: trustDomain.
    mesh_id: str = ""
    namespace: str = "default"  # the workloads' and gateways' namespace, registered as meshctl.io/namespace
    port_range: str = "21000-21999"
    state_dir: str | None = None  # default: .meshctl beside the mesh file
    pilot_port: int | None = None  # default: allocated from port_range
    ready_timeout: Duration = Duration(60.0)
    # Across hosts (docs/multi-host.md): the address other hosts reach this host's
    # sidecars at; their inbound listeners listen there (mTLS STRICT unless a
    # PeerAuthentication says otherwise). "" : 127.0.0.1, a mesh on one host.
    advertise: str = ""
    # given to every sidecar and gateway (ProxyConfig settings of the same names)
    path_normalization: str = "BASE"  # Istio meshConfig.pathNormalization
    upgrade_types: tuple[str, ...] = ("websocket",)  # HTTP/1.1 upgrades relayed to apps; never h2c
    request_timeout: Duration = Duration(300.0)  # whole request received (Envoy request_timeout); 0: none
    max_connections: int = 0  # per listener; 0: from the open-file limit
    drain_duration: Duration = Duration(5.0)  # serving after SIGTERM (Istio terminationDrainDuration)
    outbound_traffic_policy: str = "ALLOW_ANY"  # Istio meshConfig.outboundTrafficPolicy.mode (or REGISTRY_ONLY)
    # local users (names or uids) besides the mesh's own who may use the sidecars' outbound
    # listeners and bindings, which send with the workload's identity (core/peeruid.py)
    outbound_users: tuple[Any, ...] = ()
    extension_providers: tuple[ExtensionProvider, ...] = ()  # Istio meshConfig.extensionProviders (ext-authz HTTP)
    tracing: TracingSettings = TracingSettings()
    locality: str = ""  # region/zone/subzone of this host's workloads and gateways (`up --locality` overrides)


@dataclass(frozen=True, slots=True)
class MeshSpec:
    settings: MeshSettings = MeshSettings()
    services: tuple[ServiceSpec, ...] = ()
    gateways: tuple[GatewaySpec, ...] = ()
