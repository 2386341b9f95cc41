"""Compile (Istio resources + registry endpoints + a proxy's node) → ProxyConfig.

Pure: no I/O, no clock. Pilot calls it for every connected proxy whenever the
rules or the endpoints change; `route explain` and `pilot proxy-config` call
it offline with what is on disk, so what they show is what proxies run.

What Istio does, and so what this does:
- every service in the registry (and every ServiceEntry host) gets a virtual
  host on the outbound route table, answering to ``name.namespace``,
  ``name.namespace.svc`` and its FQDN, with and without the port, and to its
  short name only in the tables of proxies of its own namespace (Kubernetes'
  DNS search path: ``reviews`` from namespace X is ``reviews.X``);
- a VirtualService for that host (whose ``gateways`` include ``mesh``, the
  default) replaces the default route ("all traffic to the service");
- a DestinationRule's subsets become clusters ``outbound|PORT|SUBSET|FQDN``
  whose endpoints are the instances carrying the subset's labels, with the
  rule's traffic policy merged (subset over top level, port level over both);
- a gateway proxy gets one route table per Gateway server port, with the
  VirtualServices bound to that Gateway.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

from ..model.base import EMPTY, FrozenDict
from ..model.istio import (
    AuthorizationPolicy,
    Destination,
    DestinationRule,
    Gateway,
    HTTPMirrorPolicy,
    HTTPRoute,
    HTTPRouteDestination,
    PeerAuthentication,
    PortSelector,
    RequestAuthentication,
    PortTrafficPolicy,
    Resource,
    RouteDestination,
    Server,
    ServiceEntry,
    ServicePort,
    Sidecar,
    TCPRoute,
    TLSRoute,
    TrafficPolicy,
    VirtualService,
    WorkloadEntry,
    WorkloadGroup,
)
from ..model.proxyconfig import (
    DEFAULT_NAMESPACE,
    Cluster,
    Endpoint,
    Listener,
    Node,
    ProxyConfig,
    RouteTable,
    ServerTLS,
    Settings,
    VirtualHost,
    Workload,
    cluster_name,
    fqdn,
)
from ..core.jwt import key_source
from ..model.ratelimit import RateLimit
from .telemetry import telemetry_for
from ..registry.base import Instance, Snapshot
from .delegate import expand_delegates
from .faults import InjectedFault, faults_for_host, layer_faults

ROOT_NAMESPACE = "istio-system"  # mesh-wide security policies live here, as in Istio
META_SERVICE_PORT = "meshctl.io/service-port"
META_PROTOCOL = "meshctl.io/protocol"
META_SIDECAR = "meshctl.io/sidecar"
META_WEIGHT = "meshctl.io/weight"  # a ServiceEntry endpoint's load-balancing weight
META_LOCALITY = "meshctl.io/locality"  # region/zone/subzone of the instance (core/locality.py)
META_GATEWAY = "meshctl.io/gateway"  # a mesh.yaml gateway's instance: its Gateway servers, not PeerAuthentication, say TLS
META_NAMESPACE = "meshctl.io/namespace"  # a registry instance's namespace (its service's and identity's); a WorkloadEntry's identity's
META_SERVICE_ACCOUNT = "meshctl.io/service-account"  # the sidecar's identity is .../sa/<this> (default: the service)


@dataclass(frozen=True, slots=True)
class Service:
    host: str  # FQDN
    name: str  # short name
    namespace: str
    ports: tuple[int, ...]
    protocol: str = "http"
    instances: tuple[Instance, ...] = ()
    entry: ServiceEntry | None = None


@dataclass(slots=True)
class Inputs:
    """Everything the compiler reads, indexed once per change (not per proxy)."""

    resources: Sequence[Resource]
    snapshot: Snapshot
    trust_domain: str = "cluster.local"
    settings: Settings = field(default_factory=Settings)
    # Faults from `meshctl inject-fault` in force now (pilot/faults.py), newest first.
    faults: Sequence[InjectedFault] = ()
    services: dict[str, Service] = field(default_factory=dict)
    virtual_services: list[Resource] = field(default_factory=list)
    destination_rules: dict[str, Resource] = field(default_factory=dict)
    gateways: list[Resource] = field(default_factory=list)
    # jwksUri → JWKS text, fetched by Pilot (pilot/jwks.py)
    jwks: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.services = discover_services(self.resources, self.snapshot)
        # root VirtualServices with their delegates' routes merged in (pilot/delegate.py)
        self.virtual_services = sorted(
            expand_delegates([r for r in self.resources if isinstance(r.spec, VirtualService)], self.services),
            key=lambda r: (r.namespace, r.name))
        for r in sorted(self.resources, key=lambda r: (r.namespace, r.name)):
            if isinstance(r.spec, VirtualService):
                continue
            elif isinstance(r.spec, DestinationRule):
                host = service_host(r.spec.host, r.namespace, self.services)
                # First one wins, as Istio merges by creation time; validate warns about the rest.
                self.destination_rules.setdefault(host, r)
            elif isinstance(r.spec, Gateway):
                self.gateways.append(r)


def instance_service_port(inst: Instance) -> int:
    """The port clients use for the service (``reviews:9080``), not the sidecar's."""
    try:
        return int(inst.meta.get(META_SERVICE_PORT, inst.port))
    except ValueError:
        return inst.port


GROUP_LABEL = "workload-group"  # a registry instance's label naming its WorkloadGroup (Consul Meta allows the key)


def _grouped(inst: Instance, groups: Mapping[str, WorkloadGroup]) -> Instance:
    """A registry instance that names a WorkloadGroup (label ``workload-group: NAME``, a
    group of the instance's namespace: default, or meshctl.io/namespace) takes the group's template, as Istio's auto-registered
    WorkloadEntries do: metadata.labels (its own labels win), its sidecar's identity
    (template.serviceAccount, Istio's "default" when empty: a group's workloads run a
    sidecar), weight and locality. A name no group has leaves the instance as it is."""
    group = groups.get(inst.labels.get(GROUP_LABEL, ""))
    if group is None:
        return inst
    t = group.template or WorkloadEntry()
    labels = {**(group.metadata.labels if group.metadata is not None else {}), **inst.labels}
    meta = {**inst.meta, META_SIDECAR: "true", META_SERVICE_ACCOUNT: t.service_account or "default",
            **({META_WEIGHT: str(t.weight)} if t.weight else {}), **({META_LOCALITY: t.locality} if t.locality else {})}
    return replace(inst, labels=FrozenDict(labels), meta=FrozenDict(meta))


def discover_services(resources: Iterable[Resource], snapshot: Snapshot) -> dict[str, Service]:
    services: dict[str, Service] = {}
    resources = list(resources)
    groups: dict[str, dict[str, WorkloadGroup]] = {}  # namespace → name → group: a group takes its namespace's instances
    for r in resources:
        if isinstance(r.spec, WorkloadGroup):
            groups.setdefault(r.namespace, {})[r.name] = r.spec
    for name, found in sorted(snapshot.items()):
        # Services registered by others come as they were named (Consul keeps
        # case, Eureka apps are upper case): host names are not case-sensitive.
        name = name.lower()
        # An instance registered without a port (Consul allows it) cannot be reached.
        usable = [i for i in found if 0 < i.port < 65536]
        # A registry service lives in its instances' namespace: meshctl.io/namespace
        # (`up` under settings.namespace), else default; one name in two namespaces
        # is two services, as in Kubernetes.
        by_ns: dict[str, list[Instance]] = {}
        for i in usable:
            by_ns.setdefault(i.meta.get(META_NAMESPACE) or DEFAULT_NAMESPACE, []).append(i)
        for ns, insts in sorted(by_ns.items()) or [(DEFAULT_NAMESPACE, [])]:
            host = fqdn(name, ns)
            instances = tuple(insts)
            if groups.get(ns):
                instances = tuple(_grouped(i, groups[ns]) for i in instances)  # type: ignore[arg-type]
            if host in services:
                instances = services[host].instances + instances
            ports = tuple(sorted({instance_service_port(i) for i in instances})) or (80,)
            protos = {i.meta.get(META_PROTOCOL, "http") for i in instances}
            proto = protos.pop() if len(protos) == 1 else "http"
            services[host] = Service(host, name.split(".")[0], ns, ports, proto, instances)
    resources = list(resources)
    entries = [r for r in resources if isinstance(r.spec, WorkloadEntry)]
    # A WorkloadEntry labelled app=<service> joins that mesh service, as a Kubernetes
    # Service's app selector would take it in (a workload meshctl does not launch).
    for r in sorted(entries, key=lambda r: (r.namespace, r.name)):
        we: WorkloadEntry = r.spec  # type: ignore[assignment]
        app = we.labels.get("app", "")
        host = fqdn(app, r.namespace) if app else ""
        svc = services.get(host)
        if svc is None or svc.entry is not None:
            continue
        extra = tuple(
            Instance(id=f"{r.name}", service=svc.name, address=we.address,
                     port=we.ports.get(_port_name(svc, p), 0) or p, labels=we.labels,
                     meta=FrozenDict({META_SERVICE_PORT: str(p), **({META_WEIGHT: str(we.weight)} if we.weight else {}),
                                      **({META_LOCALITY: we.locality} if we.locality else {}),
                                      **_identity_meta(we, r.namespace)}))
            for p in svc.ports
        )
        services[host] = replace(svc, instances=svc.instances + extra)
    for r in resources:
        if not isinstance(r.spec, ServiceEntry):
            continue
        se = r.spec
        if se.workload_selector is not None and se.workload_selector.labels:
            # the WorkloadEntries of its namespace that the selector picks are its endpoints
            picked = tuple(
                w.spec for w in sorted(entries, key=lambda w: w.name)
                if isinstance(w.spec, WorkloadEntry) and w.namespace == r.namespace
                and _labels_match(se.workload_selector.labels, w.spec.labels)
            )
            se = replace(se, endpoints=se.endpoints + picked)
        ports = tuple(p.number for p in se.ports) or (80,)
        proto = "tcp" if se.ports and all((p.protocol or "").upper() in ("TCP", "TLS", "MONGO", "MYSQL") for p in se.ports) else "http"
        se_ports = se.ports or (ServicePort(number=80),)
        for h in se.hosts:
            host = fqdn(h, r.namespace) if "." not in h else h
            # Istio: traffic to a service port goes to the endpoint's port of that port's
            # name, else to the port's targetPort, else to the same port number.
            instances = tuple(
                Instance(
                    id=f"{r.name}-{i}" if len(se_ports) == 1 else f"{r.name}-{i}-{p.number}",
                    service=h,
                    address=ep.address,
                    port=ep.ports.get(p.name or "", 0) or p.target_port or p.number,
                    labels=ep.labels,
                    meta=FrozenDict({META_SERVICE_PORT: str(p.number), **({META_WEIGHT: str(ep.weight)} if ep.weight else {}),
                                     **({META_LOCALITY: ep.locality} if ep.locality else {}),
                                     **_identity_meta(ep, r.namespace)}),
                )
                for p in se_ports
                for i, ep in enumerate(se.endpoints)
            )
            if not instances and not _original_destination(se, h) and se.resolution in ("DNS", "DNS_ROUND_ROBIN", None):
                # Reach the host itself: resolved by the proxy, TTLs respected (proxy/dns.py).
                instances = tuple(
                    Instance(id=f"{r.name}-{p.number}", service=h, address=h, port=p.target_port or p.number,
                             meta=FrozenDict({META_SERVICE_PORT: str(p.number)}))
                    for p in se.ports
                )
            existing = services.get(host)
            if existing:
                instances = existing.instances + instances
            services[host] = Service(host, h.split(".")[0], r.namespace, ports, proto, instances, se)
    return services


def _identity_meta(we: WorkloadEntry, namespace: str) -> dict[str, str]:
    """A workload meshctl does not launch, with its own sidecar (a WorkloadEntry's or a
    ServiceEntry endpoint's ``serviceAccount``): reached with mTLS, expecting the SPIFFE
    identity ``ns/<its namespace>/sa/<serviceAccount>``. Without one: plaintext."""
    if not we.service_account:
        return {}
    return {META_SIDECAR: "true", META_SERVICE_ACCOUNT: we.service_account, META_NAMESPACE: namespace}


def _port_name(svc: Service, port: int) -> str:
    """A mesh service's port name for WorkloadEntry ports maps: its protocol (http, grpc, tcp)."""
    return svc.protocol


def _original_destination(se: ServiceEntry, host: str) -> bool:
    """resolution NONE (Istio's default) without endpoints: the proxy connects to the
    host the request names (a wildcard entry's hosts are many), as Envoy's ORIGINAL_DST."""
    return not se.endpoints and (se.resolution == "NONE" or (se.resolution is None and "*" in host))


def domains_for(svc: Service, port: int, primary: bool, caller_namespace: str = DEFAULT_NAMESPACE) -> tuple[str, ...]:
    """The authorities a proxy of ``caller_namespace`` reaches ``svc`` by, as Kubernetes
    DNS resolves them for a pod of that namespace (search path ``X.svc.cluster.local``,
    ``svc.cluster.local``, ``cluster.local``): a mesh service ``name.ns.svc.cluster.local``
    answers to ``name.ns``, ``name.ns.svc`` and its FQDN from any namespace, and to its
    bare ``name`` only from its own namespace ``ns`` (so ``reviews`` is the caller's own
    namespace's reviews, never another namespace's, as in Istio). Other hosts (a
    ServiceEntry's ``api.example.com``) answer to their name as written."""
    names = [svc.host]
    if svc.host.endswith(".svc.cluster.local"):
        short = svc.host.split(".")
        names = [f"{short[0]}.{short[1]}", f"{short[0]}.{short[1]}.svc", svc.host]
        if short[1] == caller_namespace:
            names.insert(0, short[0])
    out: list[str] = []
    for n in names:
        out.append(f"{n}:{port}")
        if primary:
            out.append(n)
    return tuple(out)


# ------------------------------------------------------------------ helpers


def service_host(host: str, namespace: str, services: Mapping[str, Service]) -> str:
    """A rule's host as a service key: a ServiceEntry host (``api.example``) as it is
    written, a short or ``name.namespace`` mesh name expanded to its FQDN."""
    if host in services:
        return host
    return fqdn(host, namespace)


def _vs_hosts(r: Resource, services: Mapping[str, Service] = {}) -> list[str]:
    vs: VirtualService = r.spec  # type: ignore[assignment]
    return [h if h == "*" or h.startswith("*.") else service_host(h, r.namespace, services) for h in vs.hosts]


def _applies_to_mesh(r: Resource) -> bool:
    gws = r.spec.gateways  # type: ignore[attr-defined]
    return not gws or "mesh" in gws


def _gateway_refs(r: Resource) -> set[str]:
    """``gateways:`` entries of a VirtualService as ``namespace/name``."""
    out = set()
    for g in r.spec.gateways:  # type: ignore[attr-defined]
        if g == "mesh":
            continue
        out.add(g if "/" in g else f"{r.namespace}/{g}")
    return out


def _server_host_admits(entry: str, gateway_ns: str, vs_ns: str, host: str) -> bool:
    """A Gateway server's ``hosts`` entry, ``[namespace/]host``, admits a VirtualService host:
    the namespace part (``*`` any, ``.`` the Gateway's own) names where the VirtualService may live."""
    ns, sep, pattern = entry.rpartition("/")
    if sep and ns not in ("*", vs_ns) and not (ns == "." and vs_ns == gateway_ns):
        return False
    return _host_matches(pattern, host)


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def _normalize_destination(d: Destination, ns: str, services: Mapping[str, Service]) -> Destination:
    host = fqdn(d.host, ns) if "." not in d.host or d.host.count(".") == 1 else d.host
    if host not in services and d.host in services:
        host = d.host
    port = d.port.number if d.port and d.port.number else None
    if port is None:
        svc = services.get(host)
        port = svc.ports[0] if svc else 80
    return Destination(host=host, subset=d.subset, port=PortSelector(number=port))


def _normalize_route(route: HTTPRoute, ns: str, services: Mapping[str, Service]) -> HTTPRoute:
    dests = tuple(
        replace(rd, destination=_normalize_destination(rd.destination, ns, services)) for rd in route.route
    )
    mirror = _normalize_destination(route.mirror, ns, services) if route.mirror else None
    mirrors = tuple(
        HTTPMirrorPolicy(destination=_normalize_destination(m.destination, ns, services), percentage=m.percentage)
        for m in route.mirrors
    )
    return replace(route, route=dests, mirror=mirror, mirrors=mirrors)


def _default_route(svc: Service, port: int) -> HTTPRoute:
    return HTTPRoute(
        name="default",
        route=(HTTPRouteDestination(destination=Destination(host=svc.host, port=PortSelector(number=port))),),
    )


def merge_policy(dr: DestinationRule, subset: str | None, port: int) -> TrafficPolicy | None:
    """Istio's precedence: subset policy over top-level, port-level over both; each
    setting (loadBalancer, connectionPool, outlierDetection, tls) is replaced whole."""
    top = dr.traffic_policy
    sub = next((s.traffic_policy for s in dr.subsets if s.name == subset), None) if subset else None
    merged = top or TrafficPolicy()
    for layer in (sub,):
        if layer is None:
            continue
        merged = _overlay(merged, layer)
        merged = replace(merged, port_level_settings=layer.port_level_settings or merged.port_level_settings)
    for pls in merged.port_level_settings:
        if pls.port and pls.port.number == port:
            merged = _overlay(merged, pls)
    merged = replace(merged, port_level_settings=())
    return None if merged == TrafficPolicy() else merged


def _overlay(base: TrafficPolicy, layer: TrafficPolicy | PortTrafficPolicy) -> TrafficPolicy:
    return replace(
        base,
        load_balancer=layer.load_balancer or base.load_balancer,
        connection_pool=layer.connection_pool or base.connection_pool,
        outlier_detection=layer.outlier_detection or base.outlier_detection,
        tls=layer.tls or base.tls,
    )


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _per_port(svc: Service, inst: Instance) -> bool:
    """Whether an instance serves only the service port it names: a ServiceEntry's
    endpoints, and instances that declare a service port (meshctl's workloads and
    gateways) of a service with several. An instance registered by others (Consul,
    Eureka) names no service port: its port is where it listens, and it serves the
    service whatever port the client named."""
    return svc.entry is not None or (len(svc.ports) > 1 and META_SERVICE_PORT in inst.meta)


def _endpoints(svc: Service, selector: Mapping[str, str], trust_domain: str, port: int | None = None) -> tuple[Endpoint, ...]:
    out = []
    for inst in svc.instances:
        if not _labels_match(selector, inst.labels):
            continue
        if port is not None and _per_port(svc, inst) and instance_service_port(inst) != port:
            continue  # endpoints per service port (a ServiceEntry's ports, a gateway's instances per port)
        weight = inst.meta.get(META_WEIGHT, "")
        sidecar = inst.meta.get(META_SIDECAR) == "true"
        out.append(
            Endpoint(
                address=inst.address,
                port=inst.port,
                labels=inst.labels,
                instance=inst.id,
                weight=int(weight) if weight.isdigit() and int(weight) > 0 else 1,
                health="DRAINING" if inst.draining else ("HEALTHY" if inst.healthy else "UNHEALTHY"),
                identity=f"spiffe://{trust_domain}/ns/{inst.meta.get(META_NAMESPACE) or svc.namespace}/sa/"
                         f"{inst.meta.get(META_SERVICE_ACCOUNT) or svc.name}"
                if sidecar else None,
                locality=inst.meta.get(META_LOCALITY, ""),
            )
        )
    return tuple(out)


# ------------------------------------------------------------------ the compiler


def build_clusters(inp: Inputs) -> dict[str, Cluster]:
    clusters: dict[str, Cluster] = {}
    for svc in inp.services.values():
        dr_res = inp.destination_rules.get(svc.host)
        dr: DestinationRule | None = dr_res.spec if dr_res else None  # type: ignore[assignment]
        for port in svc.ports:
            subsets: list[tuple[str | None, Mapping[str, str]]] = [(None, EMPTY)]
            if dr:
                subsets += [(s.name, s.labels) for s in dr.subsets]
            for subset, labels in subsets:
                name = cluster_name(svc.host, port, subset)
                clusters[name] = Cluster(
                    name=name,
                    service=svc.host,
                    port=port,
                    subset=subset,
                    protocol=svc.protocol,
                    traffic_policy=merge_policy(dr, subset, port) if dr else None,
                    endpoints=_endpoints(svc, labels, inp.trust_domain, port),
                    external=svc.entry is not None and svc.entry.location != "MESH_INTERNAL",
                    original_destination=svc.entry is not None and _original_destination(svc.entry, svc.host),
                    dns=_dns_mode(svc),
                    addresses=svc.entry.addresses if svc.entry is not None and subset is None else (),
                    subject_alt_names=svc.entry.subject_alt_names if svc.entry is not None else (),
                )
    return clusters


def _dns_mode(svc: Service) -> str:
    """How a ServiceEntry's endpoints given by name are resolved (proxy/dns.py): "DNS"
    (Istio's default for a named host) or "DNS_ROUND_ROBIN"; "" for addresses."""
    se = svc.entry
    if se is None or se.resolution not in ("DNS", "DNS_ROUND_ROBIN", None) or _original_destination(se, svc.host):
        return ""
    return se.resolution or "DNS"


def _address_domains(se: ServiceEntry, port: int, primary: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A ServiceEntry's addresses as a virtual host's (domains, subnets): a single address
    is an authority ("10.0.0.5:80", and "10.0.0.5" on the entry's first port), a range a subnet."""
    import ipaddress

    domains: list[str] = []
    subnets: list[str] = []
    for a in se.addresses:
        try:
            net = ipaddress.ip_network(a, strict=False)
        except ValueError:
            continue  # validate refuses it
        if net.num_addresses == 1:
            ip = str(net.network_address)
            host = f"[{ip}]" if net.version == 6 else ip
            domains.append(f"{host}:{port}")
            if primary:
                domains.append(host)
        else:
            subnets.append(str(net))
    return tuple(domains), tuple(subnets)


def _ensure_clusters(routes: Iterable[HTTPRoute | TCPRoute], clusters: dict[str, Cluster]) -> None:
    """A route may name a subset no DestinationRule defines (validate warns): give it an
    empty cluster so the proxy answers 503 "no healthy upstream", as Envoy does."""
    for r in routes:
        for rd in r.route:
            d = rd.destination
            number = d.port.number if d.port and d.port.number else 80
            name = cluster_name(d.host, number, d.subset)
            if name not in clusters:
                clusters[name] = Cluster(name=name, service=d.host, port=number, subset=d.subset)


def outbound_table(inp: Inputs, clusters: dict[str, Cluster], visible: set[str] | None = None,
                   caller_namespace: str = DEFAULT_NAMESPACE) -> RouteTable:
    """The sidecar's outbound table for a proxy of ``caller_namespace`` (short names: see domains_for)."""
    vhosts: list[VirtualHost] = []
    mesh_vs = [r for r in inp.virtual_services if _applies_to_mesh(r)]
    for svc in inp.services.values():
        if svc.protocol == "tcp" or (visible is not None and svc.host not in visible):
            continue
        vs_res = next((r for r in mesh_vs if svc.host in _vs_hosts(r, inp.services)), None)
        for i, port in enumerate(svc.ports):
            if vs_res is not None:
                routes = tuple(_normalize_route(h, vs_res.namespace, inp.services) for h in vs_res.spec.http)  # type: ignore[attr-defined]
                routes = tuple(r for r in routes if not any(m.port and m.port != port for m in r.match)) or routes
            else:
                routes = (_default_route(svc, port),)
            routes = layer_faults(routes, faults_for_host(inp.faults, svc.host))
            _ensure_clusters(routes, clusters)
            domains = domains_for(svc, port, i == 0, caller_namespace)
            subnets: tuple[str, ...] = ()
            if svc.entry is not None and svc.entry.addresses:
                extra, subnets = _address_domains(svc.entry, port, i == 0)
                domains += extra
            vhosts.append(VirtualHost(name=f"{svc.host}:{port}", domains=domains, routes=routes,
                                      subnets=subnets, port=port if subnets else None))
    return RouteTable(name="outbound", virtual_hosts=tuple(vhosts))


def _for_gateway(routes: tuple[HTTPRoute, ...], ref: str) -> tuple[HTTPRoute, ...]:
    """The routes as Gateway ``ref`` (namespace/name) sees them: a match naming other
    gateways (``gateways: [mesh]``) is dropped, one naming this one is kept without
    the condition; a route whose every match was dropped does not apply here."""
    name = ref.split("/", 1)[1]
    out = []
    for r in routes:
        if not any(m.gateways for m in r.match):
            out.append(r)
            continue
        kept = tuple(replace(m, gateways=()) for m in r.match if not m.gateways or ref in m.gateways or name in m.gateways)
        if kept:
            out.append(replace(r, match=kept))
    return tuple(out)


def gateway_tables(inp: Inputs, node: Node, clusters: dict[str, Cluster]) -> dict[int, RouteTable]:
    """Server port → route table, for the Gateways whose selector matches this gateway proxy."""
    tables: dict[int, RouteTable] = {}
    by_port: dict[int, dict[str, dict[str, tuple[HTTPRoute, ...]]]] = {}  # port → host → VirtualService → routes
    for g in inp.gateways:
        gw: Gateway = g.spec  # type: ignore[assignment]
        if not gw.selector or not _labels_match(gw.selector, node.workload.labels):
            continue
        ref = f"{g.namespace}/{g.name}"
        for server in gw.servers:
            port = server.port.number
            hosts_of = by_port.setdefault(port, {})
            for vs in inp.virtual_services:
                if ref not in _gateway_refs(vs):
                    continue
                hosts = [h for h in vs.spec.hosts if any(_server_host_admits(p, g.namespace, vs.namespace, h) for p in server.hosts)]  # type: ignore[attr-defined]
                if not hosts:
                    continue
                routes = tuple(_normalize_route(h, vs.namespace, inp.services) for h in vs.spec.http)  # type: ignore[attr-defined]
                routes = _for_gateway(routes, ref)
                for host in dict.fromkeys(f.service for f in inp.faults):
                    routes = layer_faults(routes, faults_for_host(inp.faults, host), host=host)
                _ensure_clusters(routes, clusters)
                for h in hosts:
                    entries = hosts_of.setdefault(h, {})
                    entries.setdefault(f"{vs.namespace}/{vs.name}", routes)
    # As Istio does on gateways, the VirtualServices bound to one port that name the
    # same host are merged: one virtual host, their routes in order (two Gateways on
    # port 80 with hosts "*", say Bookinfo's and cert-manager's).
    for port, hosts_of in by_port.items():
        groups: dict[tuple[str, ...], list[str]] = {}
        for h, entries in hosts_of.items():
            groups.setdefault(tuple(entries), []).append(h)
        vhosts = []
        for names, hosts in groups.items():
            domains: list[str] = []
            for h in hosts:
                domains += ["*"] if h == "*" else [h, f"{h}:{port}"]
            entries = hosts_of[hosts[0]]
            routes = tuple(r for n in names for r in entries[n])
            vhosts.append(VirtualHost(name=f"{'+'.join(names)}:{port}", domains=tuple(domains), routes=routes))
        tables[port] = RouteTable(name=f"gateway-{port}", virtual_hosts=tuple(vhosts))
    return tables


TCP_PROTOCOLS = ("TCP", "MONGO", "MYSQL", "REDIS")  # opaque bytes, routed by VirtualService tcp:
TERMINATING_MODES = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL")


def _gateway_vs(inp: Inputs, ref: str) -> list[Resource]:
    return [vs for vs in inp.virtual_services if ref in _gateway_refs(vs)]


def _l4_port_ok(matches, port: int, ref: str) -> bool:
    """A tcp/tls route applies on this Gateway port: no match, or a match for the port (and gateway)."""
    if not matches:
        return True
    return any((m.port is None or m.port == port) and (not m.gateways or any(
        g == ref or g == ref.split("/", 1)[1] for g in m.gateways)) for m in matches)


def _normalize_l4(route, ns: str, services: Mapping[str, Service]):
    return replace(route, route=tuple(
        replace(rd, destination=_normalize_destination(rd.destination, ns, services)) for rd in route.route))


def gateway_tcp_routes(inp: Inputs, ref: str, port: int, clusters: dict[str, Cluster]) -> tuple[TCPRoute, ...]:
    """VirtualService tcp: routes bound to Gateway ``ref`` that apply on ``port``, first first."""
    out: list[TCPRoute] = []
    for vs in _gateway_vs(inp, ref):
        for t in vs.spec.tcp:  # type: ignore[attr-defined]
            if _l4_port_ok(t.match, port, ref):
                out.append(_normalize_l4(t, vs.namespace, inp.services))
    _ensure_clusters(out, clusters)
    return tuple(out)


def gateway_tls_routes(inp: Inputs, ref: str, port: int, clusters: dict[str, Cluster]) -> tuple[TLSRoute, ...]:
    """VirtualService tls: routes (SNI matches) bound to Gateway ``ref`` on ``port``."""
    out: list[TLSRoute] = []
    for vs in _gateway_vs(inp, ref):
        for t in vs.spec.tls:  # type: ignore[attr-defined]
            if _l4_port_ok(t.match, port, ref):
                # sniHosts default to the VirtualService's hosts
                matches = tuple(m if m.sni_hosts else replace(m, sni_hosts=tuple(vs.spec.hosts)) for m in t.match)  # type: ignore[attr-defined]
                out.append(_normalize_l4(replace(t, match=matches), vs.namespace, inp.services))
    _ensure_clusters(out, clusters)  # type: ignore[arg-type]
    return tuple(out)


def gateway_listeners(inp: Inputs, node: Node, clusters: dict[str, Cluster]) -> tuple[list[Listener], dict[str, RouteTable]]:
    """A gateway's listeners follow the Gateways that select it (as in Istio): one per
    server port, on the host port mesh.yaml maps it to (the node's gateway
    listeners: service_port → port), else on the port itself."""
    given = [l for l in node.listeners if l.direction == "gateway"]
    port_map = {(l.service_port or l.port): l.port for l in given}
    address = given[0].address if given else "127.0.0.1"  # mesh.yaml gateways[].address
    trusted = max((l.trusted_proxies for l in given), default=0)
    http_tables = gateway_tables(inp, node, clusters)
    servers: dict[int, list[tuple[str, int, Server]]] = {}
    for g in inp.gateways:
        gw: Gateway = g.spec  # type: ignore[assignment]
        if not gw.selector or not _labels_match(gw.selector, node.workload.labels):
            continue
        for i, server in enumerate(gw.servers):
            servers.setdefault(server.port.number, []).append((f"{g.namespace}/{g.name}", i, server))
    listeners: list[Listener] = []
    tables: dict[str, RouteTable] = {}
    for port, on_port in sorted(servers.items()):
        table = http_tables.get(port, RouteTable(name=f"gateway-{port}"))
        tables[table.name] = table
        protocol = "http"
        tcp_routes: tuple[TCPRoute, ...] = ()
        tls: list[ServerTLS] = []
        redirect: list[str] = []
        for ref, i, server in on_port:
            proto = server.port.protocol.upper()
            hosts = tuple(h.split("/")[-1] for h in server.hosts) or ("*",)
            t = server.tls
            if t is not None and t.https_redirect:
                redirect += hosts
            if t is not None and proto in ("HTTPS", "TLS") and t.mode:
                inner = "tcp" if proto == "TLS" or t.mode == "PASSTHROUGH" else "http"
                tls.append(ServerTLS(
                    name=f"{ref} servers[{i}]", hosts=hosts, mode=t.mode, protocol=inner,
                    credential_name=t.credential_name, server_certificate=t.server_certificate,
                    private_key=t.private_key, ca_certificates=t.ca_certificates,
                    subject_alt_names=t.subject_alt_names, min_protocol_version=t.min_protocol_version,
                    max_protocol_version=t.max_protocol_version, cipher_suites=t.cipher_suites,
                    tcp_routes=gateway_tcp_routes(inp, ref, port, clusters) if inner == "tcp" and t.mode != "PASSTHROUGH" else (),
                    tls_routes=gateway_tls_routes(inp, ref, port, clusters) if t.mode == "PASSTHROUGH" else (),
                ))
            elif proto in TCP_PROTOCOLS:
                protocol = "tcp"
                tcp_routes = tcp_routes or gateway_tcp_routes(inp, ref, port, clusters)
        listeners.append(Listener(
            name=f"gateway-{port}", direction="gateway", address=address, port=port_map.get(port, port),
            protocol=protocol, route_table=table.name, service_port=port, tcp_routes=tcp_routes,
            trusted_proxies=trusted, tls_servers=tuple(tls), https_redirect=tuple(dict.fromkeys(redirect)),
        ))
    return listeners, tables


def tcp_routes_for(inp: Inputs, service_host: str, clusters: dict[str, Cluster], declared_port: int | None = None) -> tuple[TCPRoute, ...]:
    for r in inp.virtual_services:
        if _applies_to_mesh(r) and service_host in _vs_hosts(r, inp.services) and r.spec.tcp:  # type: ignore[attr-defined]
            svc = inp.services.get(service_host)
            on_port = declared_port or (svc.ports[0] if svc else None)
            routes = tuple(
                replace(t, route=tuple(replace(rd, destination=_normalize_destination(rd.destination, r.namespace, inp.services)) for rd in t.route))
                for t in r.spec.tcp  # type: ignore[attr-defined]
                # match: the port (and "mesh" among the match's gateways), as on gateways
                if not t.match or any((m.port is None or on_port is None or m.port == on_port)
                                      and (not m.gateways or "mesh" in m.gateways) for m in t.match)
            )
            if not routes:
                continue
            _ensure_clusters(routes, clusters)
            return routes
    # No rule: straight to the service, on the port mesh.yaml declares for it (known
    # before any instance registers); an empty cluster until its endpoints arrive.
    svc = inp.services.get(service_host)
    port = declared_port or (svc.ports[0] if svc else 80)
    if svc and port not in svc.ports:
        port = svc.ports[0]
    default = (TCPRoute(route=(RouteDestination(destination=Destination(host=service_host, port=PortSelector(number=port))),)),)
    _ensure_clusters(default, clusters)
    return default


def _selected(selector, workload: Workload) -> bool:
    return selector is None or not selector.match_labels or _labels_match(selector.match_labels, workload.labels)


def _policy_applies(r: Resource, selector, workload: Workload, gateway: bool) -> bool:
    """Whether a security policy (AuthorizationPolicy, RequestAuthentication) in
    ``r.namespace`` applies to ``workload``.

    Sidecars: policies of their own namespace and of the root namespace whose selector
    matches (or that have none). Gateways: in Istio the ingress gateway runs in the root
    namespace, so a namespace-wide policy of the workloads' namespace (Istio's
    ``allow-nothing`` in ``default``) does not reach it; a policy there reaches it only
    when its selector names the gateway's labels (``istio: ingressgateway``).
    """
    if r.namespace == ROOT_NAMESPACE:
        return _selected(selector, workload)
    if r.namespace != workload.namespace:
        return False
    if gateway:
        return selector is not None and bool(selector.match_labels) and _labels_match(selector.match_labels, workload.labels)
    return _selected(selector, workload)


def authorization_for(inp: Inputs, workload: Workload, *, gateway: bool = False) -> tuple[tuple[str, AuthorizationPolicy], ...]:
    return tuple((f"{r.namespace}/{r.name}", r.spec) for r in sorted(inp.resources, key=lambda r: (r.namespace, r.name))
                 if isinstance(r.spec, AuthorizationPolicy) and _policy_applies(r, r.spec.selector, workload, gateway))


def request_authentication_for(inp: Inputs, workload: Workload, *,
                               gateway: bool = False) -> tuple[tuple[str, RequestAuthentication], ...]:
    """RequestAuthentications that apply to the workload (the same rule as authorization_for)."""
    return tuple((f"{r.namespace}/{r.name}", r.spec) for r in sorted(inp.resources, key=lambda r: (r.namespace, r.name))
                 if isinstance(r.spec, RequestAuthentication) and _policy_applies(r, r.spec.selector, workload, gateway))


def jwks_uris(specs: Iterable[object]) -> list[str]:
    """The jwksUris named by RequestAuthentications (without an inline jwks), in order."""
    out: dict[str, None] = {}
    for spec in specs:
        if isinstance(spec, RequestAuthentication):
            for rule in spec.jwt_rules:
                if rule.jwks is None:
                    out[key_source(rule)] = None
    return list(out)


def jwks_wanted(resources: Iterable[Resource]) -> list[tuple[str, float]]:
    """(jwksUri, fetch timeout in seconds) for every jwksUri the RequestAuthentications name."""
    out: dict[str, float] = {}
    for r in resources:
        if isinstance(r.spec, RequestAuthentication):
            for rule in r.spec.jwt_rules:
                if rule.jwks is None:
                    out.setdefault(key_source(rule), float(rule.timeout) if rule.timeout is not None else 5.0)
    return list(out.items())


def rate_limits_for(inp: Inputs, workload: Workload) -> tuple[tuple[str, RateLimit], ...]:
    """meshctl RateLimits in the workload's namespace whose selector matches it (none: all of them)."""
    out = []
    for r in sorted(inp.resources, key=lambda r: (r.namespace, r.name)):
        if isinstance(r.spec, RateLimit) and r.namespace == workload.namespace and _selected(r.spec.selector, workload):
            out.append((f"{r.namespace}/{r.name}", r.spec))
    return tuple(out)


def mtls_mode_for(inp: Inputs, workload: Workload, port: int | None, default: str = "PERMISSIVE", *,
                  service_port: int | None = None) -> str:
    """PeerAuthentication precedence: workload-specific > namespace > mesh (root namespace).
    Istio's default when nothing is set is PERMISSIVE; ``default`` replaces it (STRICT for an
    inbound listener on a host's network address: nothing plaintext reaches the network
    unless a PeerAuthentication asks for it). ``portLevelMtls`` keys are the workload's port:
    the app's (``port``) or, as meshctl picks app ports from portRange, the service port the
    workload serves (Bookinfo's 9080, its container port in Istio)."""
    best: tuple[int, str] | None = None
    for r in inp.resources:
        pa = r.spec
        if not isinstance(pa, PeerAuthentication):
            continue
        if r.namespace == workload.namespace and pa.selector and pa.selector.match_labels:
            if not _selected(pa.selector, workload):
                continue
            rank = 3
        elif r.namespace == workload.namespace:
            rank = 2
        elif r.namespace == ROOT_NAMESPACE and not (pa.selector and pa.selector.match_labels):
            rank = 1
        else:
            continue
        mode = pa.mtls.mode if pa.mtls and pa.mtls.mode and pa.mtls.mode != "UNSET" else None
        key = next((p for p in (port, service_port) if p is not None and p in pa.port_level_mtls), None)
        if rank == 3 and key is not None:
            plm = pa.port_level_mtls[key].mode
            mode = plm if plm and plm != "UNSET" else mode
        if mode and (best is None or rank > best[0]):
            best = (rank, mode)
    return best[1] if best else default


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def compile_proxy(inp: Inputs, node: Node) -> ProxyConfig:
    clusters = build_clusters(inp)
    tables: dict[str, RouteTable] = {}
    listeners: list[Listener] = []
    wl = replace(node.workload, trust_domain=inp.trust_domain)
    if node.gateway:
        gw_listeners, gw_tables = gateway_listeners(inp, node, clusters)
        listeners += gw_listeners
        tables.update(gw_tables)
    sidecar = None if node.gateway else sidecar_for(inp, wl)
    for lst in node.listeners:
        if lst.direction == "gateway":
            continue  # the Gateways decide (gateway_listeners)
        elif lst.direction in ("outbound", "binding") and lst.protocol == "http":
            listeners.append(replace(lst, route_table="outbound"))
            tables.setdefault("outbound", RouteTable(name="outbound"))
        elif lst.direction == "binding" and lst.protocol == "tcp":
            host = fqdn(lst.service or "", wl.namespace)  # a short name: a service of the proxy's namespace
            listeners.append(replace(lst, service=host, tcp_routes=tcp_routes_for(inp, host, clusters, lst.service_port)))
        elif lst.direction == "inbound":
            exposed = not (lst.address == "localhost" or (_is_ip(lst.address) and ipaddress.ip_address(lst.address).is_loopback))
            listeners.append(replace(lst, mtls_mode=mtls_mode_for(inp, wl, lst.app_port, "STRICT" if exposed else "PERMISSIVE",
                                                                  service_port=lst.service_port)))
        else:
            listeners.append(lst)
    if sidecar is not None and sidecar[1].ingress:
        listeners = ingress_listeners(inp, wl, sidecar[1], listeners)
    visible = None
    if sidecar is not None and sidecar[1].egress:
        # a Sidecar's egress.hosts: the services this proxy knows (and gets clusters for); its bindings too
        bound = {fqdn(l.service, wl.namespace) for l in node.listeners if l.direction == "binding" and l.service}
        visible = {h for h, svc in inp.services.items() if h in bound or _egress_allows(sidecar[1], sidecar[0], svc)}
    if "outbound" in tables:
        tables["outbound"] = outbound_table(inp, clusters, visible, wl.namespace)
    if visible is not None:
        used = _referenced_clusters(tables, listeners)
        clusters = {n: c for n, c in clusters.items() if c.service in visible or n in used}
    # Bindings name their service by FQDN so the proxy can route origin-form requests.
    listeners = [
        replace(l, service=fqdn(l.service, wl.namespace)) if l.direction == "binding" and l.service and l.protocol == "http" else l
        for l in listeners
    ]
    authn = request_authentication_for(inp, wl, gateway=bool(node.gateway))
    cfg = ProxyConfig(
        version="",
        workload=wl,
        listeners=tuple(listeners),
        route_tables=FrozenDict(sorted(tables.items())),
        clusters=FrozenDict(sorted(clusters.items())),
        authorization=FrozenDict(authorization_for(inp, wl, gateway=bool(node.gateway))),
        rate_limits=FrozenDict(rate_limits_for(inp, wl)),
        telemetry=telemetry_for(inp.resources, wl),
        request_authentication=FrozenDict(authn),
        jwks=FrozenDict(sorted((u, inp.jwks[u]) for u in jwks_uris(s for _, s in authn) if u in inp.jwks)),
        settings=_sidecar_settings(node.settings if node.settings is not None else inp.settings, sidecar),
    )
    return replace(cfg, version=config_version(cfg))


INGRESS_TCP = ("TCP", "TLS", "MONGO", "MYSQL", "REDIS")


def ingress_listeners(inp: Inputs, wl: Workload, sc: Sidecar, listeners: list[Listener]) -> list[Listener]:
    """A Sidecar's ``ingress``, on meshctl's inbound listeners. meshctl captures no
    traffic, so each entry is a listener as Istio's captureMode NONE makes one:

    - an entry for the workload's service port, without ``bind``, is the inbound
      listener mesh.yaml gave it (the address registered for the workload): it now
      forwards to ``defaultEndpoint`` and speaks ``port.protocol``;
    - any other entry is one more inbound listener on ``bind`` (default: the
      workload's inbound address) and ``port.number``, to ``defaultEndpoint`` (default:
      the app's address on the same port), with the same mTLS and policies.

    ``defaultEndpoint`` 0.0.0.0:PORT is the app's own address (Istio: the instance IP)."""
    from ..loader.validate import ingress_address, ingress_endpoint

    out = list(listeners)
    base = next((l for l in out if l.direction == "inbound"), None)
    for ing in sc.ingress:
        proto = "tcp" if (ing.port.protocol or "HTTP").upper() in INGRESS_TCP else "http"
        ep = ingress_endpoint(ing.default_endpoint) if ing.default_endpoint else None
        app_host = base.app_address if base is not None and base.app_address else "127.0.0.1"
        target = (app_host if ep is None or ep[0] in ("0.0.0.0", "::") else ep[0], ep[1] if ep else None)
        same = next((k for k, l in enumerate(out) if l.direction == "inbound" and l.name == "inbound"
                     and l.service_port == ing.port.number), None)
        if ing.bind is None and same is not None:
            lst = out[same]
            app_port = target[1] or lst.app_port
            out[same] = replace(lst, protocol=proto, app_address=target[0] if ep else lst.app_address,
                                app_port=app_port, mtls_mode=mtls_mode_for(inp, wl, app_port, service_port=lst.service_port))
            continue
        address = (ingress_address(ing.bind) if ing.bind else None) or (base.address if base else "127.0.0.1")
        app_port = target[1] or ing.port.number
        out.append(Listener(
            name=f"ingress-{ing.port.number}", direction="inbound", address=address or "127.0.0.1",
            port=ing.port.number, protocol=proto, service_port=ing.port.number, app_address=target[0],
            app_port=app_port, mtls_mode=mtls_mode_for(inp, wl, app_port),
        ))
    return out


def sidecar_for(inp: Inputs, workload: Workload) -> tuple[str, Sidecar] | None:
    """The Sidecar resource for a workload, as Istio picks it: one in its namespace whose
    workloadSelector matches, else its namespace's one without selector, else the root
    namespace's one without selector. (namespace, Sidecar) or None."""
    best: tuple[int, str, str, Sidecar] | None = None
    for r in inp.resources:
        sc = r.spec
        if not isinstance(sc, Sidecar):
            continue
        labels = sc.workload_selector.labels if sc.workload_selector is not None else EMPTY
        if r.namespace == workload.namespace and labels:
            if not _labels_match(labels, workload.labels):
                continue
            rank = 3
        elif r.namespace == workload.namespace:
            rank = 2
        elif r.namespace == ROOT_NAMESPACE and not labels:
            rank = 1
        else:
            continue
        if best is None or rank > best[0] or (rank == best[0] and r.name < best[1]):
            best = (rank, r.name, r.namespace, sc)
    return (best[2], best[3]) if best is not None else None


def _egress_allows(sc: Sidecar, sc_namespace: str, svc: Service) -> bool:
    for eg in sc.egress:
        for h in eg.hosts:
            ns, _, name = h.partition("/")
            if ns == "~":
                continue
            if ns != "*" and (sc_namespace if ns == "." else ns) != svc.namespace:
                continue
            if name == "*" or name == svc.host or name == svc.name or _host_matches(name, svc.host):
                return True
    return False


def _referenced_clusters(tables: Mapping[str, RouteTable], listeners: Sequence[Listener]) -> set[str]:
    used: set[str] = set()
    for table in tables.values():
        for vh in table.virtual_hosts:
            for route in vh.routes:
                for d in (*(rd.destination for rd in route.route), *((route.mirror,) if route.mirror else ()),
                          *(m.destination for m in route.mirrors)):
                    used.add(cluster_name(d.host, d.port.number if d.port and d.port.number else 80, d.subset))
    for lst in listeners:
        for t in lst.tcp_routes:
            for rd in t.route:
                d = rd.destination
                used.add(cluster_name(d.host, d.port.number if d.port and d.port.number else 80, d.subset))
        if lst.direction == "binding" and lst.service:
            used.add(cluster_name(lst.service, lst.service_port or 0))
    return used


def _sidecar_settings(settings: Settings, sidecar: tuple[str, Sidecar] | None) -> Settings:
    """A Sidecar's outboundTrafficPolicy.mode overrides mesh.yaml's for its workloads."""
    if sidecar is None or sidecar[1].outbound_traffic_policy is None or not sidecar[1].outbound_traffic_policy.mode:
        return settings
    return replace(settings, outbound_traffic_policy=sidecar[1].outbound_traffic_policy.mode)


def config_version(cfg: ProxyConfig) -> str:
    """A content hash, stable across Pilot restarts: an unchanged config keeps its
    version, so proxies are not pushed what they already run."""
    body = repr(replace(cfg, version=""))
    return hashlib.sha256(body.encode()).hexdigest()[:12]
