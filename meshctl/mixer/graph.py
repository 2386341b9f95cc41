"""The service graph behind `meshctl dashboard`: who calls whom, how fast, how well.

Pure, like aggregate.py: Mixer hands it the mesh-wide counters after each
scrape round with the time (``now``); nothing here does I/O.

Rules:
1. A node is a workload's app and version (Kiali's versioned-app graph);
   callers outside the mesh are the node ``unknown``.
2. An edge is (source app, source version) → (destination service, version),
   from ``istio_requests_total`` and ``istio_request_duration_milliseconds``.
   The source reporter speaks for an edge when a client sidecar reported it
   (it sees local failures: no healthy upstream, faults injected at the
   caller), else the destination reporter.
3. Over a window: rps, error rate (5xx and 0 over all), p99 (Prometheus'
   histogram_quantile interpolation); ``mtls`` when the destination reported
   ``connection_security_policy="mutual_tls"`` for the edge.
"""

from __future__ import annotations

from collections import deque

from ..model.telemetry import is_error
from .aggregate import _LE_INDEX, NB, Key, quantile


class _EdgeAcc:
    __slots__ = ("requests", "errors", "buckets", "mtls")

    def __init__(self) -> None:
        self.requests = 0.0
        self.errors = 0.0
        self.buckets = [0.0] * NB
        self.mtls = 0.0


EdgeKey = tuple[str, str, str, str, str]  # reporter, source app, source version, destination service, version


def _short_service(name: str, ns: str) -> str:
    return name if ns in ("", "default", "unknown") else f"{name}.{ns}"


def _edge_key(d: dict[str, str]) -> EdgeKey:
    return (d.get("reporter", ""), d.get("source_app", "unknown") or "unknown",
            d.get("source_version", "unknown") or "unknown",
            _short_service(d.get("destination_service_name", "unknown"), d.get("destination_service_namespace", "")),
            d.get("destination_version", "unknown") or "unknown")


class EdgeHistory:
    def __init__(self, history_seconds: float = 300.0) -> None:
        self.history: deque[tuple[float, dict[EdgeKey, _EdgeAcc]]] = deque()
        self.history_seconds = history_seconds

    def snapshot(self, now: float, totals: dict[Key, float]) -> None:
        accs: dict[EdgeKey, _EdgeAcc] = {}
        for (name, labels), v in totals.items():
            if name == "istio_requests_total":
                d = dict(labels)
                k = _edge_key(d)
                a = accs.get(k)
                if a is None:
                    a = accs[k] = _EdgeAcc()
                a.requests += v
                code = d.get("response_code", "")
                if is_error(code, d.get("grpc_response_status", ""), d.get("response_flags", "-")):
                    a.errors += v
                if d.get("connection_security_policy") == "mutual_tls":
                    a.mtls += v
            elif name == "istio_request_duration_milliseconds_bucket":
                d = dict(labels)
                i = _LE_INDEX.get(d.get("le", ""))
                if i is None:
                    continue
                k = _edge_key(d)
                a = accs.get(k)
                if a is None:
                    a = accs[k] = _EdgeAcc()
                a.buckets[i] += v
        self.history.append((now, accs))
        while self.history and self.history[0][0] < now - self.history_seconds:
            self.history.popleft()

    def edges(self, window: float) -> list[dict]:
        """Edges over the last ``window`` seconds (every edge ever seen, 0 rps when idle)."""
        if not self.history:
            return []
        t1, cur = self.history[-1]
        t0, old = self.history[0]
        for t, accs in reversed(self.history):
            if t <= t1 - window + 1e-6:
                t0, old = t, accs
                break
        elapsed = t1 - t0
        pairs = {k[1:] for k in cur}
        out = []
        for src_app, src_ver, dst, dst_ver in sorted(pairs):
            src_k = ("source", src_app, src_ver, dst, dst_ver)
            dst_k = ("destination", src_app, src_ver, dst, dst_ver)
            key = src_k if src_k in cur and cur[src_k].requests > 0 else dst_k
            c = cur.get(key)
            if c is None:
                continue
            o = old.get(key) if elapsed > 0 else None
            req = c.requests - (o.requests if o else 0.0)
            err = c.errors - (o.errors if o else 0.0)
            buckets = [a - (b if o else 0.0) for a, b in zip(c.buckets, o.buckets if o else c.buckets)]
            dcur = cur.get(dst_k)
            mtls = dcur is not None and dcur.mtls > 0 and dcur.mtls >= dcur.requests * 0.5
            out.append({
                "source": f"{src_app} {src_ver}" if src_ver != "unknown" else src_app,
                "target": f"{dst} {dst_ver}" if dst_ver != "unknown" else dst,
                "requests": int(max(0.0, req)),
                "rps": max(0.0, req) / elapsed if elapsed > 0 else 0.0,
                "error_rate": (max(0.0, err) / req) if req > 0 else None,
                "p99": quantile(0.99, buckets) if req > 0 else None,
                "mtls": mtls,
                "total": int(c.requests),
            })
        return out
