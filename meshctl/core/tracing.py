"""Trace decisions: sampling and context propagation (B3 and W3C trace context).

Pure: no I/O, no clock, no global random (the caller passes ``rand`` and times).

Rules, as Envoy's Zipkin tracer in Istio:
1. A decision that arrives with the request is kept: ``x-b3-sampled: 1|0`` (or
   ``true|false``), ``x-b3-flags: 1`` (debug = sampled), the sampling field of a
   single ``b3`` header, the sampled bit of a W3C ``traceparent``.
2. Without one, the first proxy to see the request decides, sampling
   ``percent`` % of requests (Istio's ``randomSamplingPercentage``; 1 % by default).
3. Not sampled: nothing is recorded, and ``x-b3-sampled: 0`` is added when no
   decision was present, so later hops keep the decision (B3 allows a sampling
   state without ids). That is the whole cost of an unsampled request.
4. Sampled: each proxy records its own span, a child of the span id it received
   (or the root of a new trace), and forwards its own span id as the parent of
   the next hop, in ``traceparent`` form and in the B3 form the request came in:
   a single ``b3: {trace}-{span}-1-{parent}`` header when it arrived with one (and no
   ``x-b3-*`` ids), B3 multi-headers otherwise (Envoy's default for new traces).
   An unsampled single ``b3`` keeps its single form too (``...-0``, or ``0``).
   A sidecar's inbound listener makes a SERVER span, its outbound listener a
   CLIENT span; a gateway makes both (SERVER for the caller, CLIENT child for
   the upstream), as Envoy's spans appear in Zipkin.
"""

from __future__ import annotations

import random
from typing import Any

TRACE_HEADERS = frozenset({
    "traceparent", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
})

SERVER = "SERVER"
CLIENT = "CLIENT"


class Span:
    """One span being recorded; finished into Zipkin's v2 JSON by ``zipkin_json``."""

    __slots__ = ("trace_id", "span_id", "parent_id", "kind", "start_us")

    def __init__(self, trace_id: str, span_id: str, parent_id: str | None, kind: str, start_us: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.kind = kind
        self.start_us = start_us


def _hex_id(rand: random.Random, bits: int) -> str:
    v = 0
    while v == 0:  # all-zero ids are invalid in both B3 and trace context
        v = rand.getrandbits(bits)
    return "%0*x" % (bits // 4, v)


def _valid_hex(s: str, lengths: tuple[int, ...]) -> bool:
    if len(s) not in lengths:
        return False
    try:
        return int(s, 16) != 0
    except ValueError:
        return False


def _sampled_word(v: str) -> bool | None:
    v = v.strip().lower()
    if v in ("1", "true", "d"):
        return True
    if v in ("0", "false"):
        return False
    return None


def incoming(headers: list[tuple[str, str]]) -> tuple[str | None, str | None, bool | None, bool]:
    """(trace id, span id, sampling decision, any trace header seen) from request headers.
    B3 wins over traceparent when both are present (Envoy's Zipkin tracer reads B3)."""
    trace_id = span_id = None
    sampled: bool | None = None
    tp = b3 = None
    b3_trace = b3_span = None
    seen = False
    for k, v in headers:
        if k not in TRACE_HEADERS:
            continue
        seen = True
        if k == "x-b3-traceid":
            b3_trace = v.strip().lower()
        elif k == "x-b3-spanid":
            b3_span = v.strip().lower()
        elif k == "x-b3-sampled":
            sampled = _sampled_word(v)
        elif k == "x-b3-flags":
            if v.strip() == "1":
                sampled = True
        elif k == "b3":
            b3 = v.strip().lower()
        elif k == "traceparent":
            tp = v.strip().lower()
    if b3_trace and b3_span and _valid_hex(b3_trace, (16, 32)) and _valid_hex(b3_span, (16,)):
        trace_id, span_id = b3_trace, b3_span
    elif b3 is not None:
        parts = b3.split("-")
        if len(parts) == 1:
            s = _sampled_word(parts[0])
            sampled = s if sampled is None else sampled
        elif len(parts) >= 2 and _valid_hex(parts[0], (16, 32)) and _valid_hex(parts[1], (16,)):
            trace_id, span_id = parts[0], parts[1]
            if len(parts) >= 3 and sampled is None:
                sampled = _sampled_word(parts[2])
    if trace_id is None and tp is not None:
        parts = tp.split("-")
        if (len(parts) >= 4 and parts[0] != "ff" and _valid_hex(parts[1], (32,)) and _valid_hex(parts[2], (16,))
                and len(parts[3]) == 2):
            trace_id, span_id = parts[1], parts[2]
            if sampled is None:
                try:
                    sampled = bool(int(parts[3], 16) & 1)
                except ValueError:
                    pass
    return trace_id, span_id, sampled, seen


def _single_b3(headers: list[tuple[str, str]]) -> bool:
    """The request carries its B3 context in the single ``b3`` header (no ``x-b3-*`` ids)."""
    single = False
    for k, _ in headers:
        if k == "b3":
            single = True
        elif k == "x-b3-traceid" or k == "x-b3-spanid":
            return False
    return single


def begin(headers: list[tuple[str, str]], percent: float, rand: random.Random, now_us: int,
          gateway: bool, inbound: bool) -> tuple[list[tuple[str, str]], tuple[Span, ...]]:
    """Decide for one request: (headers to forward, spans to record — empty when not sampled)."""
    trace_id, parent, sampled, seen = incoming(headers)
    if sampled is None:
        sampled = percent >= 100.0 or (percent > 0.0 and rand.random() * 100.0 < percent)
        if not sampled:
            if seen and _single_b3(headers):
                b3 = f"{trace_id}-{parent}-0" if trace_id is not None else "0"
                return [h for h in headers if h[0] != "b3" and h[0] != "x-b3-sampled"] + [("b3", b3)], ()
            if not seen:
                headers = headers + [("x-b3-sampled", "0")]
            else:
                headers = [h for h in headers if h[0] != "x-b3-sampled"] + [("x-b3-sampled", "0")]
            return headers, ()
    if not sampled:
        return headers, ()
    if trace_id is None:
        trace_id = _hex_id(rand, 128)
        parent = None
    spans: tuple[Span, ...]
    if gateway:
        server = Span(trace_id, _hex_id(rand, 64), parent, SERVER, now_us)
        client = Span(trace_id, _hex_id(rand, 64), server.span_id, CLIENT, now_us)
        spans = (server, client)
    else:
        spans = (Span(trace_id, _hex_id(rand, 64), parent, SERVER if inbound else CLIENT, now_us),)
    last = spans[-1]
    single = seen and _single_b3(headers)
    out = [h for h in headers if h[0] not in TRACE_HEADERS]
    if single:
        b3 = f"{trace_id}-{last.span_id}-1"
        out.append(("b3", b3 if last.parent_id is None else f"{b3}-{last.parent_id}"))
        out.append(("traceparent", f"00-{trace_id.rjust(32, '0')}-{last.span_id}-01"))
        return out, spans
    out.append(("x-b3-traceid", trace_id))
    out.append(("x-b3-spanid", last.span_id))
    if last.parent_id is not None:
        out.append(("x-b3-parentspanid", last.parent_id))
    out.append(("x-b3-sampled", "1"))
    out.append(("traceparent", f"00-{trace_id.rjust(32, '0')}-{last.span_id}-01"))
    return out, spans


def zipkin_json(span: Span, *, name: str, service: str, duration_us: int, tags: dict[str, str],
                local_ip: str | None = None, remote_service: str | None = None) -> dict[str, Any]:
    """One span in Zipkin's v2 JSON model (POST /api/v2/spans takes a list of these)."""
    d: dict[str, Any] = {
        "traceId": span.trace_id,
        "id": span.span_id,
        "kind": span.kind,
        "name": name,
        "timestamp": span.start_us,
        "duration": max(1, duration_us),
        "localEndpoint": {"serviceName": service} if local_ip is None else {"serviceName": service,
                                                                              "ipv4": local_ip},
        "tags": tags,
    }
    if span.parent_id is not None:
        d["parentId"] = span.parent_id
    if remote_service:
        d["remoteEndpoint"] = {"serviceName": remote_service}
    return d


# OTLP span kinds (opentelemetry/proto/trace/v1/trace.proto, Span.SpanKind) and status codes
_OTLP_KIND = {SERVER: 2, CLIENT: 3}
_OTLP_STATUS_ERROR = 2


def otlp_json(spans: list[dict[str, Any]], scope_version: str = "") -> dict[str, Any]:
    """Zipkin v2 spans (as ``zipkin_json`` makes them) as one OTLP ExportTraceServiceRequest,
    in the JSON encoding of OTLP/HTTP: ids as hex strings, enums as numbers, 64-bit times as
    decimal strings, one ResourceSpans per service (its ``service.name`` resource attribute).
    A 64-bit B3 trace id is left-padded to OTLP's 16 bytes, as in ``traceparent``."""
    by_service: dict[str, list[dict[str, Any]]] = {}
    for z in spans:
        start_ns = int(z["timestamp"]) * 1000
        attrs = [{"key": k, "value": {"stringValue": str(v)}} for k, v in z.get("tags", {}).items()]
        remote = z.get("remoteEndpoint", {}).get("serviceName")
        if remote:
            attrs.append({"key": "peer.service", "value": {"stringValue": remote}})
        o: dict[str, Any] = {
            "traceId": z["traceId"].rjust(32, "0"),
            "spanId": z["id"],
            "name": z["name"],
            "kind": _OTLP_KIND.get(z.get("kind", ""), 0),
            "startTimeUnixNano": str(start_ns),
            "endTimeUnixNano": str(start_ns + int(z["duration"]) * 1000),
            "attributes": attrs,
        }
        if z.get("parentId"):
            o["parentSpanId"] = z["parentId"]
        if z.get("tags", {}).get("error") == "true":
            o["status"] = {"code": _OTLP_STATUS_ERROR}
        by_service.setdefault(z["localEndpoint"]["serviceName"], []).append(o)
    scope: dict[str, Any] = {"name": "meshctl"}
    if scope_version:
        scope["version"] = scope_version
    return {"resourceSpans": [
        {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
         "scopeSpans": [{"scope": scope, "spans": out}]}
        for service, out in by_service.items()
    ]}
