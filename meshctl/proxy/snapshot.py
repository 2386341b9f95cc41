"""One applied ProxyConfig, compiled for the data path.

A Snapshot is built once per config version (routers compiled, balancers
made, healthy endpoints filtered) and never mutated: a request takes the
snapshot current when it starts and uses it to the end, so a config swap
never changes the rules under a request in flight.
"""

from __future__ import annotations

import random

from ..core.balance import make_balancer
from ..core.jwt import JwtAuthenticator
from ..core.outlier import OutlierDetector
from ..core.retry import RetryPolicy, retry_policy
from ..core.route import Router
from ..model.istio import HTTPRetry
from ..model.proxyconfig import Cluster, Endpoint, Listener, ProxyConfig, cluster_name, settings_problems
from ..protocol.http1 import Limits
from .limits import ClusterLimiter, build_limiters
from .stats import ClusterStats, Stats

DIRECTIONS = ("outbound", "binding", "inbound", "gateway")


def _ep_key(e: Endpoint) -> tuple[str, int]:
    return (e.address, e.port)


class ClusterState:
    __slots__ = ("name", "cluster", "healthy", "balancer", "stats", "outlier", "limiter")

    def __init__(self, cluster: Cluster, stats: ClusterStats, outlier: OutlierDetector | None = None,
                 limiter: ClusterLimiter | None = None) -> None:
        self.name = cluster.name
        self.cluster = cluster
        self.healthy: tuple[Endpoint, ...] = tuple(e for e in cluster.endpoints if e.health == "HEALTHY")
        tp = cluster.traffic_policy
        self.balancer = make_balancer(tp.load_balancer if tp is not None else None)
        self.stats = stats
        self.outlier = outlier
        self.limiter = limiter  # connectionPool limits (limits.py); None: the shared pool, no limits

    def eligible(self, now: float) -> tuple[Endpoint, ...] | list[Endpoint]:
        """Healthy endpoints not ejected by outlier detection."""
        if self.outlier is None:
            return self.healthy
        return self.outlier.eligible(self.healthy, now, key=_ep_key)


def inbound_cluster(cfg: ProxyConfig, listener: Listener) -> Cluster:
    """The synthetic cluster an inbound listener forwards to: the app itself."""
    host = listener.service or cfg.workload.service
    return Cluster(
        name=cluster_name(host, listener.app_port or 0, None, "inbound"),
        service=host,
        port=listener.app_port or 0,
        endpoints=(Endpoint(address=listener.app_address or "127.0.0.1", port=listener.app_port or 0),),
    )


def binding_cluster_name(listener: Listener) -> str:
    return cluster_name(listener.service or "", listener.service_port or 0)


def problems(cfg: ProxyConfig) -> list[str]:
    """Everything wrong with a config that would make the proxy misbehave.
    (Bindability of listeners is checked by actually binding, in runtime.)"""
    out: list[str] = []
    seen_names: set[str] = set()
    seen_addrs: set[tuple[str, int]] = set()
    for lst in cfg.listeners:
        where = f"listener {lst.name!r}"
        if lst.name in seen_names:
            out.append(f"{where}: duplicate listener name")
        seen_names.add(lst.name)
        if (lst.address, lst.port) in seen_addrs and lst.port != 0:
            out.append(f"{where}: {lst.address}:{lst.port} is used by another listener")
        seen_addrs.add((lst.address, lst.port))
        if lst.direction not in DIRECTIONS:
            out.append(f"{where}: direction {lst.direction!r} is not one of {', '.join(DIRECTIONS)}")
            continue
        if lst.protocol not in ("http", "tcp"):
            out.append(f"{where}: protocol {lst.protocol!r} is not http or tcp")
        if lst.route_table is not None and lst.route_table not in cfg.route_tables:
            out.append(f"{where}: route table {lst.route_table!r} does not exist")
        if lst.direction in ("outbound", "gateway") and lst.route_table is None:
            out.append(f"{where}: a {lst.direction} listener needs a route_table")
        if lst.direction == "inbound" and not lst.app_port:
            out.append(f"{where}: an inbound listener needs app_port")
        if lst.direction == "binding":
            if not lst.service or not lst.service_port:
                out.append(f"{where}: a binding listener needs service and service_port")
            elif lst.protocol == "tcp":
                if lst.tcp_routes:
                    for r in lst.tcp_routes:
                        for d in r.route:
                            port = d.destination.port.number if d.destination.port else lst.service_port
                            cn = cluster_name(d.destination.host, port or 0, d.destination.subset)
                            if cn not in cfg.clusters:
                                out.append(f"{where}: tcp route destination cluster {cn!r} does not exist")
                elif binding_cluster_name(lst) not in cfg.clusters:
                    out.append(f"{where}: cluster {binding_cluster_name(lst)!r} does not exist")
            elif lst.route_table is None and binding_cluster_name(lst) not in cfg.clusters:
                out.append(f"{where}: cluster {binding_cluster_name(lst)!r} does not exist")
    for field_name, msg in settings_problems(cfg.settings):
        out.append(f"settings.{field_name}: {msg}")
    for tname, table in cfg.route_tables.items():
        for vh in table.virtual_hosts:
            for i, route in enumerate(vh.routes):
                for d in route.route:
                    dest = d.destination
                    if dest.port is None or dest.port.number is None:
                        out.append(
                            f"route table {tname!r} host {vh.name!r} route {i}: destination {dest.host!r} has no port"
                        )
                        continue
                    cn = cluster_name(dest.host, dest.port.number, dest.subset)
                    if cn not in cfg.clusters:
                        out.append(f"route table {tname!r} host {vh.name!r} route {i}: cluster {cn!r} does not exist")
    return out


class Snapshot:
    """A config compiled for serving. Build with Snapshot.build (may raise from core)."""

    def __init__(self, cfg: ProxyConfig, stats: Stats, outliers: dict[str, OutlierDetector] | None = None,
                 limiters: dict[str, ClusterLimiter] | None = None) -> None:
        self.cfg = cfg
        self.version = cfg.version
        self.settings = cfg.settings
        s = cfg.settings
        self.limits = Limits(max_header_bytes=s.max_request_headers_kb * 1024, max_headers=s.max_headers,
                             upgrades=frozenset(t.lower() for t in s.upgrade_types if t.lower() != "h2c"))
        self.routers: dict[str, Router] = {name: Router(t, s) for name, t in cfg.route_tables.items()}
        # outlier detectors outlive config versions: ejections and counters carry over
        old = outliers if outliers is not None else {}
        self.outliers: dict[str, OutlierDetector] = {}
        for name, c in cfg.clusters.items():
            od = c.traffic_policy.outlier_detection if c.traffic_policy is not None else None
            if od is None:
                continue
            hosts = [_ep_key(e) for e in c.endpoints]
            det = old.get(name)
            if det is None:
                det = OutlierDetector(od, hosts)
            else:
                det.reconfigure(od)
                det.update_hosts(hosts)
            self.outliers[name] = det
        # connection-pool limiters outlive config versions too (limits.commit_limiters applies them)
        self.limiters: dict[str, ClusterLimiter] = build_limiters(cfg, self.limits, stats, limiters)
        self.clusters: dict[str, ClusterState] = {
            name: ClusterState(c, stats.cluster(name), self.outliers.get(name), self.limiters.get(name))
            for name, c in cfg.clusters.items()
        }
        self.listener_clusters: dict[str, ClusterState] = {}
        for lst in cfg.listeners:
            if lst.direction == "inbound" and lst.app_port:
                c = inbound_cluster(cfg, lst)
                self.listener_clusters[lst.name] = ClusterState(c, stats.cluster(c.name))
        self.no_retry: RetryPolicy = retry_policy(HTTPRetry(attempts=0), s)
        ns = cfg.workload.namespace
        auth = cfg.authorization  # Pilot: {"namespace/name": policy}; hand-written configs may list policies
        self.authz_policies = tuple(auth.items()) if hasattr(auth, "items") else tuple(
            (f"{ns}/policy-{i}", p) for i, p in enumerate(auth))
        rules = [r for ra in cfg.request_authentication.values() for r in ra.jwt_rules]
        self.jwt: JwtAuthenticator | None = JwtAuthenticator(rules, cfg.jwks) if rules else None
        self.stats = stats
        self.passthrough: dict[tuple[str, int, str], ClusterState] = {}  # egress.py: clusters of hosts named by requests
        self.source_labels = cfg.workload.labels
        self.source_namespace = cfg.workload.namespace

    def pick_tcp_cluster(self, listener: Listener, rand: random.Random) -> ClusterState | None:
        """The cluster a TCP binding connection goes to: weighted pick over the
        first tcp route, or the service's own cluster when there are none."""
        if listener.tcp_routes:
            route = listener.tcp_routes[0]
            dests = route.route
            if not dests:
                return None
            total = sum((d.weight if d.weight is not None else 100) for d in dests)
            x = rand.uniform(0, total) if total > 0 else 0
            chosen = dests[-1]
            acc = 0.0
            for d in dests:
                acc += d.weight if d.weight is not None else 100
                if x < acc:
                    chosen = d
                    break
            port = chosen.destination.port.number if chosen.destination.port else listener.service_port
            return self.clusters.get(cluster_name(chosen.destination.host, port or 0, chosen.destination.subset))
        return self.clusters.get(binding_cluster_name(listener))
