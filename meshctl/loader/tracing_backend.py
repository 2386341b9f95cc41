"""Telemetry tracing settings against the mesh's tracing backend. Pure.

A Telemetry ``tracing[].randomSamplingPercentage`` (or ``disableSpanReporting:
false``, which asks for spans) does nothing in a mesh whose ``settings.tracing``
names no backend (neither ``zipkin`` nor ``otlp``): no proxy samples or sends a
span. That would be configuration accepted and not carried out, so `route apply`
(against the running mesh's settings, which Pilot hands every proxy) and `route
validate --mesh mesh.yaml` refuse it by name. ``disableSpanReporting: true`` asks
for no spans, which is what such a mesh does: it passes.
"""

from __future__ import annotations

from typing import Sequence

from ..model.istio import Resource
from ..model.telemetry_api import Telemetry
from .resources import source_of
from .validate import Finding


def wants_tracing(resources: Sequence[Resource]) -> bool:
    return any(isinstance(r.spec, Telemetry) and r.spec.tracing for r in resources)


def tracing_backend_findings(resources: Sequence[Resource], has_backend: bool, mesh: str) -> list[Finding]:
    """An error for each Telemetry tracing field that asks for spans when ``mesh``
    (``"the running mesh"``, or a mesh.yaml path) has no tracing backend."""
    if has_backend:
        return []
    out: list[Finding] = []
    for r in resources:
        if not isinstance(r.spec, Telemetry):
            continue
        for i, t in enumerate(r.spec.tracing):
            asks = []
            if t.random_sampling_percentage is not None:
                asks.append(f"spec.tracing[{i}].randomSamplingPercentage")
            if t.disable_span_reporting is False:
                asks.append(f"spec.tracing[{i}].disableSpanReporting")
            for field in asks:
                out.append(Finding(
                    "error", source_of(r, field), field,
                    f"{mesh} has no tracing backend (settings.tracing names neither zipkin nor otlp), so no "
                    "proxy samples or sends a span and this would do nothing: set settings.tracing.zipkin or "
                    "settings.tracing.otlp in mesh.yaml (`meshctl up` applies it to a running mesh), then apply "
                    f"Telemetry {r.namespace}/{r.name} again"))
    return out
