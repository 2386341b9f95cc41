"""Counters the data path increments, rendered as Prometheus text by the admin server.

Increments must be cheap (they happen on every request): plain attribute
and list updates on small objects, looked up once per request.
Istio-named metrics (istio_requests_total, ...) come later, from mixer/.
"""

from __future__ import annotations

from collections import Counter
from typing import Final, TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.breaker import Breaker

# Envoy-style response flags the pipeline sets on a request.
UF: Final = "UF"  # upstream connection failure
UR: Final = "UR"  # upstream reset
UT: Final = "UT"  # upstream request timeout
UH: Final = "UH"  # no healthy upstream
NR: Final = "NR"  # no route
UPE: Final = "UPE"  # upstream protocol error (malformed response)
DPE: Final = "DPE"  # downstream protocol error
DC: Final = "DC"  # downstream connection terminated
URX: Final = "URX"  # retry limit exceeded (attempts used up)
DI: Final = "DI"  # delay injected (fault)
FI: Final = "FI"  # abort injected (fault)
RBAC: Final = "RBAC"  # denied by an AuthorizationPolicy
UO: Final = "UO"  # upstream overflow: a connectionPool (circuit breaker) limit was reached

REASONS = {
    UF: "upstream connect failure",
    UR: "upstream reset",
    UT: "upstream timeout",
    UH: "no healthy upstream",
    NR: "no route",
    UPE: "upstream protocol error",
    UO: "upstream overflow",
}


class ClusterStats:
    __slots__ = ("name", "rq_total", "rq_xx", "cx_active", "cx_total", "cx_connect_fail", "rq_retry", "rq_timeout",
                 "cx_overflow", "rq_pending_overflow", "rq_retry_overflow", "breaker")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rq_total = 0
        self.rq_xx = [0, 0, 0, 0, 0, 0]  # index = status // 100 (0 unused)
        self.cx_active = 0
        self.cx_total = 0
        self.cx_connect_fail = 0
        self.rq_retry = 0
        self.rq_timeout = 0
        # circuit breaking (limits.py), Envoy's names
        self.cx_overflow = 0  # a request had to queue: tcp.maxConnections reached
        self.rq_pending_overflow = 0  # 503 UO: http1MaxPendingRequests or http2MaxRequests reached
        self.rq_retry_overflow = 0  # a retry not made: http.maxRetries reached
        self.breaker: Breaker | None = None  # the cluster's breaker while it has connectionPool limits

    def response(self, status: int) -> None:
        self.rq_total += 1
        c = status // 100
        if 1 <= c <= 5:
            self.rq_xx[c] += 1


class ListenerStats:
    __slots__ = ("name", "rq_total", "rq_xx", "cx_active", "cx_total", "cx_peer_refused", "cx_tls_refused")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rq_total = 0
        self.rq_xx = [0, 0, 0, 0, 0, 0]
        self.cx_active = 0
        self.cx_total = 0
        self.cx_peer_refused = 0  # outbound/binding: a local user not allowed (peercheck.py)
        self.cx_tls_refused = 0  # inbound: mutual TLS required and not given, or the peer's identity refused (identity.py)

    def response(self, status: int) -> None:
        self.rq_total += 1
        c = status // 100
        if 1 <= c <= 5:
            self.rq_xx[c] += 1


class Stats:
    def __init__(self) -> None:
        self.clusters: dict[str, ClusterStats] = {}
        self.listeners: dict[str, ListenerStats] = {}
        self.flags: Counter[str] = Counter()
        self.config_applied = 0
        self.config_rejected = 0

    def cluster(self, name: str) -> ClusterStats:
        st = self.clusters.get(name)
        if st is None:
            st = self.clusters[name] = ClusterStats(name)
        return st

    def listener(self, name: str) -> ListenerStats:
        st = self.listeners.get(name)
        if st is None:
            st = self.listeners[name] = ListenerStats(name)
        return st

    def flag(self, flag: str) -> None:
        self.flags[flag] += 1

    # ------------------------------------------------------------ exposition

    def render(self) -> str:
        out: list[str] = []

        def series(metric: str, kind: str, help_: str, label: str, rows) -> None:
            """One family: a line per (label value, number)."""
            out.append(f"# HELP {metric} {help_}")
            out.append(f"# TYPE {metric} {kind}")
            for name, value in rows:
                out.append(f'{metric}{{{label}="{_esc(name)}"}} {value}')

        def by_class(metric: str, help_: str, label: str, items) -> None:
            out.append(f"# HELP {metric} {help_}")
            out.append(f"# TYPE {metric} counter")
            for it in items:
                for k in range(1, 6):
                    out.append(f'{metric}{{{label}="{_esc(it.name)}",response_code_class="{k}xx"}} {it.rq_xx[k]}')

        cl = sorted(self.clusters.values(), key=lambda c: c.name)
        up = "meshctl_cluster_upstream_"
        series(up + "rq_total", "counter", "Requests sent upstream (each try counts).", "cluster",
               [(c.name, c.rq_total) for c in cl])
        by_class(up + "rq_xx", "Upstream responses by status class.", "cluster", cl)
        for metric, kind, help_ in _CLUSTER_SERIES:
            series(up + metric, kind, help_, "cluster", [(c.name, getattr(c, metric)) for c in cl])
        limited = [c for c in cl if c.breaker is not None]
        for metric, help_, attr in _BREAKER_GAUGES:
            series(up + metric, "gauge", help_, "cluster", [(c.name, getattr(c.breaker, attr)) for c in limited])

        ls = sorted(self.listeners.values(), key=lambda x: x.name)
        down = "meshctl_downstream_"
        series(down + "rq_total", "counter", "Requests answered downstream.", "listener", [(x.name, x.rq_total) for x in ls])
        by_class(down + "rq_xx", "Downstream responses by status class.", "listener", ls)
        series(down + "cx_active", "gauge", "Open downstream connections.", "listener", [(x.name, x.cx_active) for x in ls])
        series(down + "cx_total", "counter", "Downstream connections accepted.", "listener", [(x.name, x.cx_total) for x in ls])
        series(down + "cx_peer_refused", "counter", "Connections refused: a local user settings.outboundUsers does not allow.",
               "listener", [(x.name, x.cx_peer_refused) for x in ls])
        series(down + "cx_tls_refused", "counter", "Connections refused by the listener's mutual TLS: no or an untrusted "
               "client certificate, plaintext on a STRICT port, a failed handshake.",
               "listener", [(x.name, x.cx_tls_refused) for x in ls])

        series("meshctl_response_flags_total", "counter", "Requests by Envoy-style response flag.", "flag",
               sorted(self.flags.items()))
        for metric, help_, value in (("meshctl_config_applied_total", "Configs applied.", self.config_applied),
                                     ("meshctl_config_rejected_total", "Configs rejected.", self.config_rejected)):
            out.append(f"# HELP {metric} {help_}")
            out.append(f"# TYPE {metric} counter")
            out.append(f"{metric} {value}")
        return "\n".join(out) + "\n"


# ClusterStats attributes exposed as meshctl_cluster_upstream_<attribute>, in exposition order
_CLUSTER_SERIES = (
    ("cx_active", "gauge", "Open upstream connections."),
    ("cx_total", "counter", "Upstream connections opened."),
    ("cx_connect_fail", "counter", "Failed upstream connects."),
    ("rq_retry", "counter", "Retries sent upstream."),
    # circuit breaking, on every cluster
    ("cx_overflow", "counter", "Requests that queued because tcp.maxConnections was reached."),
    ("rq_pending_overflow", "counter", "Requests answered 503 UO: http1MaxPendingRequests or http2MaxRequests reached."),
    ("rq_retry_overflow", "counter", "Retries not made: http.maxRetries reached."),
)
# circuit breaking gauges of the clusters with connectionPool limits: (metric, help, Breaker attribute)
_BREAKER_GAUGES = (
    ("rq_pending_active", "Requests waiting for an upstream connection.", "pending"),
    ("rq_active", "Requests holding an upstream connection (limited clusters).", "active"),
    ("rq_retry_active", "Retries in flight (limited clusters).", "retries"),
)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
