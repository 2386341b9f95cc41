"""Outlier detection: eject upstream hosts that keep failing, Envoy-style.

Istio's DestinationRule ``trafficPolicy.outlierDetection`` is resolved into
an ``OutlierConfig`` (Istio's defaults, Istio's translation of deprecated
fields); one ``OutlierDetector`` per cluster then watches every response.
Pure: ``now`` (monotonic seconds) is passed in; no I/O, no randomness.

Per host there are three consecutive-failure counters and one state:

  counter            counts                                       threshold (0 = off)
  -----------------  -------------------------------------------  -----------------------------------
  consecutive_5xx    5xx responses (and, when split is off,       consecutive5xxErrors (default 5)
                     local-origin failures, as 503/504)
  consecutive_gw     502/503/504 responses (idem)                 consecutiveGatewayErrors (default 0)
  consecutive_local  local-origin failures: connect-failure,      consecutiveLocalOriginFailures
                     timeout, reset, refused-stream               (default 5; only when
                     (only when split is on)                      splitExternalLocalOriginErrors)

  state    event                                  condition                       next     action
  -------  -------------------------------------  ------------------------------  -------  ------------------
  ACTIVE   response < 500                         -                               ACTIVE   5xx, gw := 0
                                                                                           (local := 0 if split)
  ACTIVE   response 5xx / mapped local failure    a counter reaches threshold,    EJECTED  return Eject;
                                                  ejection allowed                         that counter := 0
  ACTIVE   (same)                                 a counter reaches threshold,    ACTIVE   that counter := 0
                                                  max_ejection_percent reached
  ACTIVE   local failure (split on)               consecutive_local reaches it    EJECTED  return Eject
  EJECTED  any response                           counters move, no re-ejection   EJECTED  -
  EJECTED  time passes (any call with now)        now >= until                    ACTIVE   Uneject (via tick)
  any      sweep (every ``interval``, in tick)    ACTIVE and multiplier > 0       ACTIVE   multiplier -= 1

Rules:
1. Ejection time is ``base_ejection_time × multiplier``, where the
   multiplier goes up by one at each ejection (the number of times the host
   has been ejected), capped at ``max(max_ejection_time, base_ejection_time)``
   (Envoy's 300s). Like Envoy, the multiplier goes down by one at every
   sweep (``interval``) the host spends un-ejected, so a host that recovered
   is forgiven over time.
2. Ejection is allowed while ``(ejected + 1) / hosts ≤ max_ejection_percent``
   (Istio default 10%); like current Envoy, one host can always be ejected
   when none is.
3. ``eligible`` returns the hosts not ejected. If the healthy share
   is below ``min_health_percent`` (Istio default 0: off), outlier detection
   is ignored and all hosts are returned (Envoy's panic mode). If every host
   is ejected and there is no panic, the list is empty: answer 503 "no
   healthy upstream".
4. Deprecated ``consecutiveErrors`` is translated as Istio does: it sets the
   gateway-error threshold (502/503/504) and turns the 5xx rule off, unless
   ``consecutiveGatewayErrors`` / ``consecutive5xxErrors`` are given, which win.
5. Difference from Envoy, on purpose: a host comes back as soon as its
   ejection time is over, even if no sweep has run yet (Envoy waits for the
   next sweep, up to ``interval`` later). ``tick`` reports the unejections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from ..model.istio import OutlierDetection

__all__ = [
    "OutlierConfig",
    "OutlierDetector",
    "Eject",
    "Uneject",
    "HostStatus",
    "outlier_config",
    "LOCAL_FAILURES",
]

Host = tuple[str, int]
T = TypeVar("T")

# local-origin failures the proxy may report (same names as core.retry.Outcome.failure)
LOCAL_FAILURES: dict[str, int] = {
    "connect-failure": 503,
    "reset": 503,
    "refused-stream": 503,
    "timeout": 504,
}

DEFAULT_MAX_EJECTION_TIME = 300.0


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    consecutive_local_origin: int = 5
    split_local_origin: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME
    max_ejection_percent: int = 10
    min_health_percent: int = 0


def outlier_config(od: OutlierDetection) -> OutlierConfig:
    """Istio OutlierDetection → the effective settings, with Istio's defaults."""
    c5 = 5
    cgw = 0
    if od.consecutive_errors is not None and od.consecutive_errors > 0:
        cgw = od.consecutive_errors
        c5 = 0
    if od.consecutive_gateway_errors is not None:
        cgw = max(0, od.consecutive_gateway_errors)
    if od.consecutive_5xx_errors is not None:
        c5 = max(0, od.consecutive_5xx_errors)
    split = bool(od.split_external_local_origin_errors)
    local = 5
    if od.consecutive_local_origin_failures is not None and od.consecutive_local_origin_failures > 0:
        local = od.consecutive_local_origin_failures
    interval = float(od.interval) if od.interval is not None and od.interval > 0 else 10.0
    base = float(od.base_ejection_time) if od.base_ejection_time is not None and od.base_ejection_time > 0 else 30.0
    mep = od.max_ejection_percent if od.max_ejection_percent is not None and od.max_ejection_percent > 0 else 10
    mhp = od.min_health_percent if od.min_health_percent is not None and od.min_health_percent > 0 else 0
    return OutlierConfig(
        consecutive_5xx=c5,
        consecutive_gateway=cgw,
        consecutive_local_origin=local,
        split_local_origin=split,
        interval=interval,
        base_ejection_time=base,
        max_ejection_percent=min(100, mep),
        min_health_percent=min(100, mhp),
    )


@dataclass(frozen=True, slots=True)
class Eject:
    host: Host
    reason: str  # "consecutive-5xx" | "consecutive-gateway-errors" | "consecutive-local-origin-failures"
    until: float
    duration: float
    times_ejected: int  # the multiplier used


@dataclass(frozen=True, slots=True)
class Uneject:
    host: Host
    at: float  # when the ejection time ended


@dataclass(frozen=True, slots=True)
class HostStatus:
    ejected: bool
    until: float | None
    times_ejected: int  # current multiplier (rule 1)
    ejections_total: int
    consecutive_5xx: int
    consecutive_gateway: int
    consecutive_local_origin: int


class _HostState:
    __slots__ = ("c5xx", "cgw", "clocal", "ejected", "until", "multiplier", "total")

    def __init__(self) -> None:
        self.c5xx = 0
        self.cgw = 0
        self.clocal = 0
        self.ejected = False
        self.until = 0.0
        self.multiplier = 0
        self.total = 0


_INF = float("inf")


class OutlierDetector:
    """Per-cluster outlier detection. See the table at the top of the module."""

    def __init__(self, od: OutlierDetection | OutlierConfig, hosts: Sequence[Host] = ()) -> None:
        self.config = od if isinstance(od, OutlierConfig) else outlier_config(od)
        self._hosts: dict[Host, _HostState] = {h: _HostState() for h in hosts}
        self._ejected: set[Host] = set()
        self._earliest_until = _INF
        self._unejected: list[Uneject] = []
        self._next_sweep: float | None = None
        self.refused_ejections = 0  # thresholds reached while max_ejection_percent was reached

    # ------------------------------------------------------------ config and host set

    def reconfigure(self, od: OutlierDetection | OutlierConfig) -> None:
        """A new config version: new settings, host states and ejections kept."""
        self.config = od if isinstance(od, OutlierConfig) else outlier_config(od)

    def update_hosts(self, hosts: Sequence[Host]) -> None:
        """The cluster's endpoints changed: forget removed hosts, keep the state of the others."""
        keep = set(hosts)
        for h in list(self._hosts):
            if h not in keep:
                del self._hosts[h]
                self._ejected.discard(h)
        for h in hosts:
            if h not in self._hosts:
                self._hosts[h] = _HostState()
        self._earliest_until = min((self._hosts[h].until for h in self._ejected), default=_INF)

    # ------------------------------------------------------------ per request

    def record(self, host: Host, *, status: int | None, local_failure: str | None = None, now: float) -> Eject | None:
        """One request's outcome on ``host``: a response ``status``, or a
        ``local_failure`` ("connect-failure" | "timeout" | "reset" | "refused-stream")."""
        if now >= self._earliest_until:
            self._expire(now)
        st = self._hosts.get(host)
        if st is None:
            st = self._hosts[host] = _HostState()
        cfg = self.config
        if status is None:
            if local_failure is None:
                raise ValueError("record() needs a status or a local_failure")
            if cfg.split_local_origin:
                st.clocal += 1
                if cfg.consecutive_local_origin and st.clocal >= cfg.consecutive_local_origin:
                    st.clocal = 0
                    return self._eject(host, st, "consecutive-local-origin-failures", now)
                return None
            status = LOCAL_FAILURES.get(local_failure, 503)
        elif cfg.split_local_origin:
            st.clocal = 0  # the connection worked
        if status < 500:
            st.c5xx = 0
            st.cgw = 0
            return None
        result: Eject | None = None
        if 502 <= status <= 504:
            st.cgw += 1
            if cfg.consecutive_gateway and st.cgw >= cfg.consecutive_gateway:
                st.cgw = 0
                result = self._eject(host, st, "consecutive-gateway-errors", now)
        else:
            st.cgw = 0
        st.c5xx += 1
        if cfg.consecutive_5xx and st.c5xx >= cfg.consecutive_5xx:
            st.c5xx = 0
            if result is None:
                result = self._eject(host, st, "consecutive-5xx", now)
        return result

    def _eject(self, host: Host, st: _HostState, reason: str, now: float) -> Eject | None:
        if st.ejected:
            return None
        cfg = self.config
        n = len(self._hosts)
        ejected = len(self._ejected)
        if ejected > 0 and (ejected + 1) * 100 > cfg.max_ejection_percent * n:
            self.refused_ejections += 1
            return None
        cap = max(cfg.max_ejection_time, cfg.base_ejection_time)
        if st.multiplier * cfg.base_ejection_time < cap:
            st.multiplier += 1
        duration = min(cfg.base_ejection_time * st.multiplier, cap)
        st.ejected = True
        st.until = now + duration
        st.total += 1
        self._ejected.add(host)
        if st.until < self._earliest_until:
            self._earliest_until = st.until
        return Eject(host=host, reason=reason, until=st.until, duration=duration, times_ejected=st.multiplier)

    def _expire(self, now: float) -> None:
        earliest = _INF
        for h in list(self._ejected):
            st = self._hosts[h]
            if st.until <= now:
                st.ejected = False
                self._ejected.discard(h)
                self._unejected.append(Uneject(host=h, at=st.until))
            elif st.until < earliest:
                earliest = st.until
        self._earliest_until = earliest

    def eligible(self, hosts: Sequence[T], now: float, key: Callable[[T], Host] | None = None) -> Sequence[T]:
        """The hosts a load balancer may pick now (rule 3). Returns ``hosts``
        itself when nothing is ejected (no allocation on the common path).
        ``key`` maps an item to its (address, port) when ``hosts`` holds
        something else, e.g. ``key=lambda e: (e.address, e.port)`` for Endpoints."""
        if now >= self._earliest_until:
            self._expire(now)
        if not self._ejected:
            return hosts
        ejected = self._ejected
        if key is None:
            ok = [h for h in hosts if h not in ejected]
        else:
            ok = [h for h in hosts if key(h) not in ejected]
        mhp = self.config.min_health_percent
        if mhp and len(ok) * 100 < mhp * len(hosts):
            return hosts  # panic: too few healthy hosts, use them all
        return ok

    def is_ejected(self, host: Host, now: float) -> bool:
        if now >= self._earliest_until:
            self._expire(now)
        return host in self._ejected

    # ------------------------------------------------------------ timer

    @property
    def next_tick(self) -> float | None:
        """When tick() next has work to do (an ejection ending, or a sweep)."""
        if self._next_sweep is None:
            return self._earliest_until if self._earliest_until != _INF else None
        return min(self._next_sweep, self._earliest_until)

    def tick(self, now: float) -> list[Uneject]:
        """Run the sweep: end ejections whose time is over, and lower the
        multiplier of hosts that stayed in service for a whole interval.
        Call it every ``config.interval`` seconds (or at ``next_tick``).
        Returns every unejection since the previous tick, oldest first."""
        if now >= self._earliest_until:
            self._expire(now)
        if self._next_sweep is None:
            self._next_sweep = now + self.config.interval
        if now >= self._next_sweep:
            interval = self.config.interval
            sweeps = int((now - self._next_sweep) // interval) + 1
            first = self._next_sweep
            for st in self._hosts.values():
                if not st.ejected and st.multiplier > 0:
                    # a sweep at t counts when the host was in service for the whole interval before t
                    k = max(0, math.ceil((st.until + interval - first) / interval))
                    if sweeps > k:
                        st.multiplier = max(0, st.multiplier - (sweeps - k))
            self._next_sweep += sweeps * interval
        out, self._unejected = self._unejected, []
        return out

    # ------------------------------------------------------------ inspection

    def status(self, now: float) -> dict[Host, HostStatus]:
        if now >= self._earliest_until:
            self._expire(now)
        return {
            h: HostStatus(
                ejected=st.ejected,
                until=st.until if st.ejected else None,
                times_ejected=st.multiplier,
                ejections_total=st.total,
                consecutive_5xx=st.c5xx,
                consecutive_gateway=st.cgw,
                consecutive_local_origin=st.clocal,
            )
            for h, st in self._hosts.items()
        }
