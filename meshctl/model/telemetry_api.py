"""Istio's Telemetry API (``telemetry.istio.io`` v1, v1beta1, v1alpha1 ``Telemetry``).

Read by the reflective loader like every Istio kind; the fields meshctl does
not carry out are refused by name in loader/unsupported.py. What a proxy gets
is ``TelemetryPolicy``: the Telemetry resources that reach its workload,
merged by pilot/telemetry.py in Istio's order (root namespace, then the
workload's namespace, then those whose selector names the workload):

- ``tracing[].randomSamplingPercentage``: the share of requests traced where no
  caller decided (replaces mesh.yaml's ``settings.tracing.sampling``);
  ``disableSpanReporting``: context is propagated, spans are not recorded.
- ``accessLogging[]``: ``disabled`` (and ``providers: [{name: envoy}]`` to turn
  it on), per ``match.mode`` (CLIENT: requests this sidecar sends, SERVER: those
  it receives); ``filter.expression``, a CEL expression over request and
  response attributes (core/celfilter.py has the subset meshctl evaluates).
- ``metrics[].overrides[]``: ``disabled`` and ``tagOverrides{}: {operation:
  REMOVE}`` per metric (``match.metric``, ALL_METRICS by default) and reporter
  (``match.mode``), applied to the Prometheus endpoint (``/metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import EMPTY, Duration, FrozenDict
from .istio import API_VERSIONS, SPEC_TYPES, WorkloadSelector

MODES = ("CLIENT_AND_SERVER", "CLIENT", "SERVER")
# Istio's standard metrics (Telemetry MetricSelector.IstioMetric) → Prometheus family names
METRICS: dict[str, tuple[str, ...]] = {
    "REQUEST_COUNT": ("istio_requests_total",),
    "REQUEST_DURATION": ("istio_request_duration_milliseconds",),
    "REQUEST_SIZE": ("istio_request_bytes",),
    "RESPONSE_SIZE": ("istio_response_bytes",),
    "TCP_OPENED_CONNECTIONS": ("istio_tcp_connections_opened_total",),
    "TCP_CLOSED_CONNECTIONS": ("istio_tcp_connections_closed_total",),
    "TCP_SENT_BYTES": ("istio_tcp_sent_bytes_total",),
    "TCP_RECEIVED_BYTES": ("istio_tcp_received_bytes_total",),
    "GRPC_REQUEST_MESSAGES": ("istio_request_messages_total",),
    "GRPC_RESPONSE_MESSAGES": ("istio_response_messages_total",),
}
METRICS["ALL_METRICS"] = tuple(n for names in METRICS.values() for n in names)


@dataclass(frozen=True, slots=True)
class ProviderRef:
    name: str = ""


@dataclass(frozen=True, slots=True)
class TargetRef:
    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class ModeSelector:
    mode: str = "CLIENT_AND_SERVER"


@dataclass(frozen=True, slots=True)
class CustomTagValue:
    name: str = ""
    default_value: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class CustomTag:
    literal: CustomTagValue | None = None
    environment: CustomTagValue | None = None
    header: CustomTagValue | None = None
    formatter: CustomTagValue | None = None


@dataclass(frozen=True, slots=True)
class Tracing:
    match: ModeSelector | None = None
    providers: tuple[ProviderRef, ...] = ()
    random_sampling_percentage: float | None = None
    disable_span_reporting: bool | None = None
    disable_context_propagation: bool | None = None
    custom_tags: FrozenDict[str, CustomTag] = EMPTY
    use_request_id_for_trace_sampling: bool | None = None
    enable_istio_tags: bool | None = None


@dataclass(frozen=True, slots=True)
class AccessLogFilter:
    expression: str = ""


@dataclass(frozen=True, slots=True)
class AccessLogging:
    match: ModeSelector | None = None
    providers: tuple[ProviderRef, ...] = ()
    disabled: bool | None = None
    filter: AccessLogFilter | None = None


@dataclass(frozen=True, slots=True)
class MetricSelector:
    metric: str | None = None
    custom_metric: str | None = None
    mode: str = "CLIENT_AND_SERVER"


@dataclass(frozen=True, slots=True)
class TagOverride:
    operation: str = "UPSERT"
    value: str | None = None


@dataclass(frozen=True, slots=True)
class MetricsOverrides:
    match: MetricSelector | None = None
    disabled: bool | None = None
    tag_overrides: FrozenDict[str, TagOverride] = EMPTY


@dataclass(frozen=True, slots=True)
class Metrics:
    providers: tuple[ProviderRef, ...] = ()
    overrides: tuple[MetricsOverrides, ...] = ()
    reporting_interval: Duration | None = None


@dataclass(frozen=True, slots=True)
class Telemetry:
    selector: WorkloadSelector | None = None
    target_ref: TargetRef | None = None
    target_refs: tuple[TargetRef, ...] = ()
    tracing: tuple[Tracing, ...] = ()
    access_logging: tuple[AccessLogging, ...] = ()
    metrics: tuple[Metrics, ...] = ()


SPEC_TYPES[("telemetry.istio.io", "Telemetry")] = Telemetry
API_VERSIONS.setdefault("telemetry.istio.io", ("v1", "v1beta1", "v1alpha1"))


# ---------------------------------------------------------------- what a proxy gets


@dataclass(frozen=True, slots=True)
class MetricOverride:
    """One override, in the order they apply: the families it covers, the reporters
    (``source`` for CLIENT, ``destination`` for SERVER), and what it does."""

    families: tuple[str, ...]
    reporters: tuple[str, ...]
    disabled: bool | None = None
    remove_tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TelemetryPolicy:
    sampling: float | None = None  # randomSamplingPercentage; None: mesh.yaml's settings.tracing.sampling
    span_reporting: bool = True  # False: disableSpanReporting (context still propagated)
    access_log_client: bool = True  # requests this proxy sends (outbound, gateway)
    access_log_server: bool = True  # requests it receives (inbound)
    access_log_filter: str = ""  # CEL expression (core/celfilter.py); "" = every request
    metric_overrides: tuple[MetricOverride, ...] = ()
    sources: tuple[str, ...] = ()  # "namespace/name" of the Telemetry resources merged


def telemetry_problems(spec: Telemetry) -> list[str]:
    """Meaning errors (``field: message``) in a Telemetry spec the loader has shaped
    (the filter expressions are checked by loader/validate.py with core/celfilter.py)."""
    out: list[str] = []
    for i, t in enumerate(spec.tracing):
        p = t.random_sampling_percentage
        if p is not None and not 0.0 <= p <= 100.0:
            out.append(f"spec.tracing[{i}].randomSamplingPercentage: {p:g} is not a percentage between 0 and 100")
        if t.match is not None and t.match.mode not in MODES:
            out.append(f"spec.tracing[{i}].match.mode: {t.match.mode!r} is not one of {', '.join(MODES)}")
    for i, a in enumerate(spec.access_logging):
        if a.match is not None and a.match.mode not in MODES:
            out.append(f"spec.accessLogging[{i}].match.mode: {a.match.mode!r} is not one of {', '.join(MODES)}")
    for i, m in enumerate(spec.metrics):
        for j, o in enumerate(m.overrides):
            where = f"spec.metrics[{i}].overrides[{j}]"
            if o.match is not None:
                if o.match.metric is not None and o.match.metric not in METRICS:
                    out.append(f"{where}.match.metric: {o.match.metric!r} is not one of {', '.join(METRICS)}")
                if o.match.mode not in MODES:
                    out.append(f"{where}.match.mode: {o.match.mode!r} is not one of {', '.join(MODES)}")
            for tag, to in o.tag_overrides.items():
                if to.operation not in ("UPSERT", "REMOVE"):
                    out.append(f"{where}.tagOverrides.{tag}.operation: {to.operation!r} is not UPSERT or REMOVE")
                elif to.operation == "UPSERT" and to.value is None:
                    out.append(f"{where}.tagOverrides.{tag}: an UPSERT needs a value (meshctl implements "
                               "operation: REMOVE)")
    return out
