"""Which Telemetry resources reach a workload, merged into its TelemetryPolicy.

Istio's hierarchy (reference/config/telemetry): workload-specific (a selector
that matches) over namespace-wide (no selector, the workload's namespace) over
mesh-wide (no selector, the root namespace ``istio-system``). A selector in the
root namespace picks matching workloads in every namespace. Gateways are
reached by a selector naming their labels (``istio: ingressgateway``).

Tracing and access-logging fields are taken from the most specific resource
that sets them; metric overrides accumulate in the same order (mesh, then
namespace, then workload), a later one winning where they disagree.
The selector label ``service.istio.io/canonical-name`` is the workload's app
(``canonical-revision``: its version), as Istio derives them.
"""

from __future__ import annotations

from typing import Iterable

from ..model.istio import Resource
from ..model.proxyconfig import Workload
from ..model.telemetry_api import METRICS, MetricOverride, Telemetry, TelemetryPolicy

ROOT_NAMESPACE = "istio-system"
_REPORTERS = {"CLIENT_AND_SERVER": ("source", "destination"), "CLIENT": ("source",), "SERVER": ("destination",)}


def _labels(w: Workload) -> dict[str, str]:
    labels = dict(w.labels)
    labels.setdefault("service.istio.io/canonical-name", labels.get("app", w.service))
    if "version" in labels:
        labels.setdefault("service.istio.io/canonical-revision", labels["version"])
    return labels


def _rank(r: Resource, spec: Telemetry, w: Workload) -> int:
    """0: does not reach the workload; 1 mesh, 2 namespace, 3 workload."""
    sel = spec.selector.match_labels if spec.selector is not None else None
    if sel:
        if r.namespace not in (w.namespace, ROOT_NAMESPACE):
            return 0
        labels = _labels(w)
        return 3 if all(labels.get(k) == v for k, v in sel.items()) else 0
    if r.namespace == w.namespace:
        return 2
    return 1 if r.namespace == ROOT_NAMESPACE else 0


def telemetry_for(resources: Iterable[Resource], w: Workload) -> TelemetryPolicy:
    chosen = sorted(((rank, r.namespace, r.name, r.spec) for r in resources
                     if isinstance(r.spec, Telemetry) and (rank := _rank(r, r.spec, w))),
                    key=lambda t: (t[0], t[1], t[2]))
    if not chosen:
        return TelemetryPolicy()
    sampling: float | None = None
    reporting = True
    client = server = True
    flt = ""
    overrides: list[MetricOverride] = []
    for _, _, _, spec in chosen:  # least specific first: later ones win
        for t in spec.tracing:
            if t.random_sampling_percentage is not None:
                sampling = float(t.random_sampling_percentage)
            if t.disable_span_reporting is not None:
                reporting = not t.disable_span_reporting
        for a in spec.access_logging:
            mode = a.match.mode if a.match is not None else "CLIENT_AND_SERVER"
            on = None
            if a.disabled is not None:
                on = not a.disabled
            elif a.providers:
                on = True
            if on is not None:
                if mode in ("CLIENT_AND_SERVER", "CLIENT"):
                    client = on
                if mode in ("CLIENT_AND_SERVER", "SERVER"):
                    server = on
            if a.filter is not None:
                flt = a.filter.expression
        for m in spec.metrics:
            for o in m.overrides:
                metric = (o.match.metric if o.match is not None else None) or "ALL_METRICS"
                mode = o.match.mode if o.match is not None else "CLIENT_AND_SERVER"
                removed = tuple(sorted(tag for tag, to in o.tag_overrides.items() if to.operation == "REMOVE"))
                overrides.append(MetricOverride(METRICS.get(metric, ()), _REPORTERS.get(mode, ()), o.disabled, removed))
    return TelemetryPolicy(sampling=sampling, span_reporting=reporting, access_log_client=client,
                           access_log_server=server, access_log_filter=flt, metric_overrides=tuple(overrides),
                           sources=tuple(f"{ns}/{name}" for _, ns, name, _ in chosen))
