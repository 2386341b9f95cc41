"""One cluster as a config version serves it: its healthy endpoints, balancer, stats,
outlier detector, connection-pool limits, locality plan and slow start (made by
snapshot.Snapshot, once per config version).

Its own module, compiled (setup.py's COMPILED): the forwarder and the stages read a
request's ClusterState a score of times per request (healthy, balancer, limiter, outlier,
stats, ...), natively once it is a native class; as an interpreted class each read was a
generic attribute look-up (~170 instructions).
"""

from __future__ import annotations

import random
from typing import Sequence

from ..core.balance import make_balancer, takes_lone_endpoint
from ..core.locality import OFF, LocalityPlan, choose, plan_locality
from ..core.outlier import OutlierDetector
from ..core.warmup import SlowStart
from ..model.proxyconfig import Cluster, Endpoint, Workload
from .limits import ClusterLimiter
from .stats import ClusterStats

__all__ = ["ClusterState"]


def _ep_key(e: Endpoint) -> tuple[str, int]:
    return (e.address, e.port)


class ClusterState:
    __slots__ = ("name", "cluster", "healthy", "balancer", "stats", "outlier", "limiter", "locality", "slow_start",
                 "shaped", "lone_pick", "_observed", "h2_rule", "dns")

    def __init__(self, cluster: Cluster, stats: ClusterStats, outlier: OutlierDetector | None = None,
                 limiter: ClusterLimiter | None = None, caller: Workload | None = None,
                 slow_start: SlowStart | None = None) -> None:
        self.name = cluster.name
        self.cluster = cluster
        self.healthy: tuple[Endpoint, ...] = tuple(e for e in cluster.endpoints if e.health == "HEALTHY")
        tp = cluster.traffic_policy
        lb = tp.load_balancer if tp is not None else None
        self.balancer = make_balancer(lb)
        self.lone_pick = takes_lone_endpoint(self.balancer)  # one endpoint: no PickContext needed (forward.py)
        self.stats = stats
        self.outlier = outlier
        self.limiter = limiter  # connectionPool limits (limits.py); None: the shared pool, no limits
        # locality load balancing (core/locality.py) and slow start (core/warmup.py)
        self.locality: LocalityPlan = OFF
        if caller is not None and tp is not None:
            self.locality = plan_locality(lb.locality_lb_setting if lb is not None else None,
                                          tp.outlier_detection is not None, caller.locality, caller.labels, self.healthy)
        self.slow_start = slow_start
        self.shaped = self.locality.active or slow_start is not None  # candidates() does more than eligible()
        self._observed = False
        self.h2_rule = -1  # protocols.wants_h2's rule for this cluster, found by its first request
        self.dns: str = cluster.dns  # (read per try: natively here, generically on the Cluster)

    def eligible(self, now: float) -> Sequence[Endpoint]:
        """Healthy endpoints not ejected by outlier detection."""
        if self.outlier is None:
            return self.healthy
        return self.outlier.eligible(self.healthy, now, key=_ep_key)

    def candidates(self, now: float, rand: random.Random, excluded: frozenset[int] = frozenset()) -> Sequence[Endpoint]:
        """What the balancer picks from for one request: the eligible endpoints of the
        locality chosen for it (``excluded``: priority levels a retry leaves out), with
        slow-start weights."""
        eps: Sequence[Endpoint] = self.eligible(now)
        if self.locality.active:
            eps = choose(self.locality, eps, rand, excluded)
        ss = self.slow_start
        if ss is not None:
            if not self._observed:
                ss.observe(self.healthy, now)
                self._observed = True
            eps = ss.weigh(eps, now)
        return eps


