"""Slow start: an endpoint that joins a cluster gets its share of requests gradually.

Istio's DestinationRule ``loadBalancer.warmupDurationSecs`` and ``warmup``
(``duration``, ``minimumPercent``, ``aggression``), carried out as Envoy's
slow start mode documents (Istio configures that mode from them). Pure: the
time (``now``, monotonic seconds) is passed in; one ``SlowStart`` per
cluster keeps when each endpoint joined.

Rules:

1. An endpoint is in slow start for ``duration`` after it joined: the first
   time this proxy balanced over the cluster with it there (registry-healthy).
   One that leaves the cluster (deregistered, or unhealthy) and comes back
   joins again, as Envoy's hosts do when active health checking brings them
   back. Endpoints that were there when the proxy first balanced over the
   cluster joined together: they share one factor, so nothing changes for
   them (Envoy: slow start helps when a few endpoints join, not all).
2. While in slow start its weight is scaled by
       max(minimumPercent / 100, time_factor ** (1 / aggression)),
       time_factor = max(seconds since it joined, 1) / duration,
   with Envoy's and Istio's defaults minimumPercent 10, aggression 1.0
   (linear). ``warmupDurationSecs: D`` is ``warmup: {duration: D}``.
3. Only ROUND_ROBIN (also unset) and LEAST_REQUEST balancers do slow start,
   as in Envoy; ``route validate`` refuses it with RANDOM, PASSTHROUGH or
   consistentHash rather than ignoring it.
4. Weights are integers in the balancer: while any endpoint is in slow
   start, every weight is multiplied by 100 and the scaled ones rounded
   (at least 1), so a factor of 0.1 is 10 against 100.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from ..model.istio import LoadBalancerSettings
from ..model.proxyconfig import Endpoint

__all__ = ["WarmupConfig", "SlowStart", "warmup_config", "weight_factor", "SLOW_START_POLICIES"]

SLOW_START_POLICIES = (None, "UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN")
_SCALE = 100


@dataclass(frozen=True, slots=True)
class WarmupConfig:
    duration: float
    minimum_percent: float = 10.0
    aggression: float = 1.0


def warmup_config(lb: LoadBalancerSettings | None) -> WarmupConfig | None:
    """The slow start of a loadBalancer; None when it has none (``warmup`` wins over
    ``warmupDurationSecs``, as the newer field)."""
    if lb is None:
        return None
    w = lb.warmup
    if w is not None and w.duration is not None and float(w.duration) > 0:
        return WarmupConfig(
            float(w.duration),
            10.0 if w.minimum_percent is None else float(w.minimum_percent),
            1.0 if w.aggression is None else float(w.aggression),
        )
    if lb.warmup_duration_secs is not None and float(lb.warmup_duration_secs) > 0:
        return WarmupConfig(float(lb.warmup_duration_secs))
    return None


def weight_factor(cfg: WarmupConfig, age: float) -> float:
    """Rule 2: the share of its weight an endpoint that joined ``age`` seconds ago gets."""
    if age >= cfg.duration:
        return 1.0
    time_factor = max(age, 1.0) / cfg.duration
    ramp = time_factor ** (1.0 / cfg.aggression) if cfg.aggression > 0 else 1.0
    return min(1.0, max(cfg.minimum_percent / 100.0, ramp))


def _key(ep: Endpoint) -> tuple[str, int]:
    return (ep.address, ep.port)


class SlowStart:
    """When each endpoint of one cluster joined, and the weights that gives."""

    __slots__ = ("cfg", "_joined", "_hosts")

    def __init__(self, cfg: WarmupConfig) -> None:
        self.cfg = cfg
        self._joined: dict[tuple[str, int], float] = {}
        self._hosts: frozenset[tuple[str, int]] | None = None

    def reconfigure(self, cfg: WarmupConfig) -> None:
        self.cfg = cfg

    def observe(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """The cluster's (registry-healthy) endpoints now: newcomers join at ``now``, leavers are forgotten."""
        hosts = frozenset(_key(e) for e in endpoints)
        if hosts == self._hosts:
            return
        joined = self._joined
        for k in [k for k in joined if k not in hosts]:
            del joined[k]
        for k in hosts:
            joined.setdefault(k, now)
        self._hosts = hosts

    def factor(self, ep: Endpoint, now: float) -> float:
        joined = self._joined.get(_key(ep))
        return 1.0 if joined is None else weight_factor(self.cfg, now - joined)

    def weigh(self, endpoints: Sequence[Endpoint], now: float) -> Sequence[Endpoint]:
        """``endpoints`` with their weights scaled (rule 4); the same sequence when none is warming up."""
        factors = [self.factor(e, now) for e in endpoints]
        if all(f >= 1.0 for f in factors) or len(set(factors)) == 1:
            return endpoints
        out = []
        for e, f in zip(endpoints, factors):
            w = e.weight if e.weight > 1 else 1
            out.append(dataclasses.replace(e, weight=max(1, round(w * _SCALE * f))))
        return out
