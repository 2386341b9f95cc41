"""One applied ProxyConfig, compiled for the data path.

A Snapshot is built once per config version (routers compiled, balancers
made, healthy endpoints filtered) and never mutated: a request takes the
snapshot current when it starts and uses it to the end, so a config swap
never changes the rules under a request in flight. Whether a config hangs
together is loader.proxyconfig.check_proxy_config's to say (the runtime calls
it before building a Snapshot); building one raises core.errors.CoreConfigError
for a rule core cannot compile.
"""

from __future__ import annotations

import random

from typing import Sequence, cast

from ..core.celfilter import parse as parse_cel
from ..core.jwt import JwtAuthenticator
from ..core.outlier import OutlierDetector
from ..core.warmup import SlowStart, warmup_config
from ..core.retry import RetryPolicy
from ..core.retrypolicy import retry_policy
from ..core.route import Router
from ..core.routebuild import build_router
from ..model.istio import AuthorizationPolicy, HTTPRetry
from ..model.proxyconfig import Cluster, Endpoint, Listener, ProxyConfig, Workload, cluster_name
from ..protocol.http1 import Limits
from .limits import ClusterLimiter, build_limiters
from .clusterstate import ClusterState, _ep_key
from .stats import Stats

__all__ = ["ClusterState", "Snapshot", "inbound_cluster", "binding_cluster_name"]

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


class Snapshot:
    """A config compiled for serving. Build with Snapshot.build (may raise from core)."""

    def __init__(self, cfg: ProxyConfig, stats: Stats, outliers: dict[str, OutlierDetector] | None = None,
                 limiters: dict[str, ClusterLimiter] | None = None, slow_starts: dict[str, SlowStart] | None = None) -> None:
        self.cfg = cfg
        self.version = cfg.version
        self.settings = cfg.settings
        s = cfg.settings
        # Istio Telemetry (pilot/telemetry.py): the trace sampling rate in force and the access-log filter
        tp = cfg.telemetry
        self.trace_sampling: float = tp.sampling if tp.sampling is not None else s.tracing_sampling
        self.access_filter: tuple | None = parse_cel(tp.access_log_filter) if tp.access_log_filter else None
        self.limits = Limits(max_header_bytes=s.max_request_headers_kb * 1024, max_headers=s.max_headers,
                             upgrades=frozenset(t.lower() for t in s.upgrade_types if t.lower() != "h2c"))
        self.routers: dict[str, Router] = {name: build_router(t, s) for name, t in cfg.route_tables.items()}
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
        # slow-start join times outlive config versions too
        self.slow_starts: dict[str, SlowStart] = {}
        for name, c in cfg.clusters.items():
            wc = warmup_config(c.traffic_policy.load_balancer if c.traffic_policy is not None else None)
            if wc is None:
                continue
            ss = (slow_starts or {}).get(name)
            if ss is None:
                ss = SlowStart(wc)
            else:
                ss.reconfigure(wc)
            self.slow_starts[name] = ss
        self.clusters: dict[str, ClusterState] = {
            name: ClusterState(c, stats.cluster(name), self.outliers.get(name), self.limiters.get(name), cfg.workload,
                               self.slow_starts.get(name))
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
        self.authz_policies: tuple[tuple[str, AuthorizationPolicy], ...] = tuple(auth.items()) if hasattr(auth, "items") else tuple(
            (f"{ns}/policy-{i}", p) for i, p in enumerate(cast(Sequence[AuthorizationPolicy], auth)))
        rules = [r for ra in cfg.request_authentication.values() for r in ra.jwt_rules]
        self.jwt: JwtAuthenticator | None = JwtAuthenticator(rules, cfg.jwks) if rules else None
        self.stats = stats
        self.passthrough: dict[tuple[str, int, str], ClusterState] = {}  # egress.py: clusters of hosts named by requests
        self.stats = stats
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
