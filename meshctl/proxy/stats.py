"""Counters the data path increments, rendered as Prometheus text by the admin server.

Increments must be cheap (they happen on every request): plain attribute
and list updates on small objects, looked up once per request.
Istio-named metrics (istio_requests_total, ...) come later, from mixer/.
"""

from __future__ import annotations

from collections import Counter

# Envoy-style response flags the pipeline sets on a request.
UF = "UF"  # upstream connection failure
UR = "UR"  # upstream reset
UT = "UT"  # upstream request timeout
UH = "UH"  # no healthy upstream
NR = "NR"  # no route
UPE = "UPE"  # upstream protocol error (malformed response)
DPE = "DPE"  # downstream protocol error
DC = "DC"  # downstream connection terminated
URX = "URX"  # retry limit exceeded (attempts used up)
DI = "DI"  # delay injected (fault)
FI = "FI"  # abort injected (fault)
RBAC = "RBAC"  # denied by an AuthorizationPolicy
UO = "UO"  # upstream overflow: a connectionPool (circuit breaker) limit was reached

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
        self.breaker = None  # the cluster's core.breaker.Breaker while it has connectionPool limits

    def response(self, status: int) -> None:
        self.rq_total += 1
        c = status // 100
        if 1 <= c <= 5:
            self.rq_xx[c] += 1


class ListenerStats:
    __slots__ = ("name", "rq_total", "rq_xx", "cx_active", "cx_total")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rq_total = 0
        self.rq_xx = [0, 0, 0, 0, 0, 0]
        self.cx_active = 0
        self.cx_total = 0

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

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        cl = sorted(self.clusters.values(), key=lambda c: c.name)
        family("meshctl_cluster_upstream_rq_total", "counter", "Requests sent upstream (each try counts).")
        for c in cl:
            out.append(f'meshctl_cluster_upstream_rq_total{{cluster="{_esc(c.name)}"}} {c.rq_total}')
        family("meshctl_cluster_upstream_rq_xx", "counter", "Upstream responses by status class.")
        for c in cl:
            for k in range(1, 6):
                out.append(
                    f'meshctl_cluster_upstream_rq_xx{{cluster="{_esc(c.name)}",response_code_class="{k}xx"}} {c.rq_xx[k]}'
                )
        family("meshctl_cluster_upstream_cx_active", "gauge", "Open upstream connections.")
        for c in cl:
            out.append(f'meshctl_cluster_upstream_cx_active{{cluster="{_esc(c.name)}"}} {c.cx_active}')
        family("meshctl_cluster_upstream_cx_total", "counter", "Upstream connections opened.")
        for c in cl:
            out.append(f'meshctl_cluster_upstream_cx_total{{cluster="{_esc(c.name)}"}} {c.cx_total}')
        family("meshctl_cluster_upstream_cx_connect_fail", "counter", "Failed upstream connects.")
        for c in cl:
            out.append(f'meshctl_cluster_upstream_cx_connect_fail{{cluster="{_esc(c.name)}"}} {c.cx_connect_fail}')
        family("meshctl_cluster_upstream_rq_retry", "counter", "Retries sent upstream.")
        for c in cl:
            out.append(f'meshctl_cluster_upstream_rq_retry{{cluster="{_esc(c.name)}"}} {c.rq_retry}')
        _render_breakers(cl, family, out)

        ls = sorted(self.listeners.values(), key=lambda x: x.name)
        family("meshctl_downstream_rq_total", "counter", "Requests answered downstream.")
        for x in ls:
            out.append(f'meshctl_downstream_rq_total{{listener="{_esc(x.name)}"}} {x.rq_total}')
        family("meshctl_downstream_rq_xx", "counter", "Downstream responses by status class.")
        for x in ls:
            for k in range(1, 6):
                out.append(
                    f'meshctl_downstream_rq_xx{{listener="{_esc(x.name)}",response_code_class="{k}xx"}} {x.rq_xx[k]}'
                )
        family("meshctl_downstream_cx_active", "gauge", "Open downstream connections.")
        for x in ls:
            out.append(f'meshctl_downstream_cx_active{{listener="{_esc(x.name)}"}} {x.cx_active}')
        family("meshctl_downstream_cx_total", "counter", "Downstream connections accepted.")
        for x in ls:
            out.append(f'meshctl_downstream_cx_total{{listener="{_esc(x.name)}"}} {x.cx_total}')

        family("meshctl_response_flags_total", "counter", "Requests by Envoy-style response flag.")
        for f in sorted(self.flags):
            out.append(f'meshctl_response_flags_total{{flag="{f}"}} {self.flags[f]}')
        family("meshctl_config_applied_total", "counter", "Configs applied.")
        out.append(f"meshctl_config_applied_total {self.config_applied}")
        family("meshctl_config_rejected_total", "counter", "Configs rejected.")
        out.append(f"meshctl_config_rejected_total {self.config_rejected}")
        return "\n".join(out) + "\n"


def _render_breakers(cl: list[ClusterStats], family, out: list[str]) -> None:
    """Circuit-breaking counters (every cluster) and gauges (clusters with connectionPool limits)."""
    for metric, attr, help_ in (
        ("upstream_cx_overflow", "cx_overflow", "Requests that queued because tcp.maxConnections was reached."),
        ("upstream_rq_pending_overflow", "rq_pending_overflow",
         "Requests answered 503 UO: http1MaxPendingRequests or http2MaxRequests reached."),
        ("upstream_rq_retry_overflow", "rq_retry_overflow", "Retries not made: http.maxRetries reached."),
    ):
        family(f"meshctl_cluster_{metric}", "counter", help_)
        for c in cl:
            out.append(f'meshctl_cluster_{metric}{{cluster="{_esc(c.name)}"}} {getattr(c, attr)}')
    limited = [c for c in cl if c.breaker is not None]
    for metric, attr, help_ in (
        ("upstream_rq_pending_active", "pending", "Requests waiting for an upstream connection."),
        ("upstream_rq_active", "active", "Requests holding an upstream connection (limited clusters)."),
        ("upstream_rq_retry_active", "retries", "Retries in flight (limited clusters)."),
    ):
        family(f"meshctl_cluster_{metric}", "gauge", help_)
        for c in limited:
            out.append(f'meshctl_cluster_{metric}{{cluster="{_esc(c.name)}"}} {getattr(c.breaker, attr)}')


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
