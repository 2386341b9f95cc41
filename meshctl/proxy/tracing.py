"""Distributed tracing: one stage that decides and propagates, one exporter that batches.

The decisions (sample or not, which ids, which headers) are core/tracing.py's.
Here: ``TRACE`` runs right after ``prepare`` in every HTTP chain; when the
request is not sampled it costs one pass over the headers (and one ``x-b3-sampled:
0`` header where nobody decided yet). ``finish`` is called from
telemetry.finish_request for sampled requests only; the spans go to a bounded
buffer that ``Tracer.run`` POSTs in batches, off the request path, to Zipkin
(``/api/v2/spans``, v2 JSON) and/or an OpenTelemetry collector (OTLP/HTTP
``/v1/traces``, OTLP's JSON encoding). When a collector is down, its batch is
dropped (counted in ``dropped`` when no collector took it), never queued without
bound, and requests never wait.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque

import meshctl.proxy.aio as aio
from ..core import tracing as T
from ..model.proxyconfig import _otlp_url, _zipkin_address
from ..model.telemetry import GRPC_SERVER_ERRORS
from ..plainhttp import HTTPError
from .ctlhttp import control_client

log = logging.getLogger("meshctl.proxy.tracing")

RECENT = 500  # the last spans kept for the admin's /traces (Mixer's trace list on the dashboard)
BATCH = 200  # spans per POST
BUFFER = 5000  # spans kept while the collector is slow or down
INTERVAL = 1.0  # seconds between flushes


class Tracer:
    """The span buffer and its exporter (one per proxy process)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.recent: deque[dict] = deque(maxlen=RECENT)  # whatever the collectors do with them
        self.sent = 0
        self.dropped = 0
        self.failures = 0
        self._wake = aio.Event()

    def add(self, span: dict) -> None:
        self.recent.append(span)
        if len(self.spans) >= BUFFER:
            self.dropped += 1
            return
        self.spans.append(span)
        if len(self.spans) == 1 or len(self.spans) >= BATCH:
            self._wake.set()  # the first span starts the INTERVAL; a full batch goes at once

    async def run(self, rt) -> None:
        """Flush the buffer to the collector in rt's current settings, INTERVAL after the first
        span waiting or at BATCH spans. With nothing to send it sleeps without a timer (a
        wake-up of an idle loop costs a busy sidecar's next request ~0.15 ms).
        The HTTP client (proxy/ctlhttp.py) is made on the first span."""
        client = None
        try:
            while True:
                if not self.spans:
                    await self._wake.wait()  # the first span
                self._wake = aio.Event()
                if len(self.spans) < BATCH:
                    with aio.move_on_after(INTERVAL):
                        await self._wake.wait()  # a full batch
                    self._wake = aio.Event()
                if not self.spans:
                    continue
                if client is None:
                    client = control_client(timeout=5.0)
                await self._flush(rt, client)
        finally:
            if client is not None:
                with aio.CancelScope(shield=True):
                    await client.aclose()

    async def _flush(self, rt, client) -> None:
        while self.spans:
            settings = rt.snapshot.settings
            zipkin = _zipkin_address(settings.tracing_zipkin) if settings.tracing_zipkin else None
            otlp = _otlp_url(settings.tracing_otlp) if settings.tracing_otlp else None
            if zipkin is None and otlp is None:  # tracing turned off since: drop what was recorded
                self.dropped += len(self.spans)
                self.spans = []
                return
            batch, self.spans = self.spans[:BATCH], self.spans[BATCH:]
            delivered = False
            if zipkin is not None:
                host, port = zipkin
                if ":" in host:
                    host = f"[{host}]"
                delivered |= await self._post(client, "zipkin", f"http://{host}:{port}/api/v2/spans",
                                              json.dumps(batch), len(batch))
            if otlp is not None:
                delivered |= await self._post(client, "otlp", otlp, json.dumps(T.otlp_json(batch)), len(batch))
            if delivered:
                self.sent += len(batch)
            else:
                self.dropped += len(batch)
                return

    async def _post(self, client, what: str, url: str, body: str, n: int) -> bool:
        try:
            r = await client.post(url, content=body.encode(), headers=[("content-type", "application/json")])
            if r.status_code >= 300:
                raise HTTPError(f"HTTP {r.status_code}: {r.text[:200]}")
            return True
        except HTTPError as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                log.warning("tracing: cannot send %d spans to %s %s: %s (%d failures)", n, what, url, exc,
                            self.failures)
            return False


class TraceStage:
    """Decide sampling and rewrite the trace headers before routing (so routes forward them)."""

    name = "trace"

    async def on_request(self, rq):
        settings = rq.snap.settings
        if not settings.tracing_zipkin and not settings.tracing_otlp:
            return None
        lst = rq.listener
        headers, spans = T.begin(rq.headers, rq.snap.trace_sampling, rq.rt.rand, int(time.time() * 1e6),
                                 lst.direction == "gateway", lst.direction == "inbound")
        rq.headers = headers
        if spans:
            rq.trace = spans
        return None


TRACE = TraceStage()


def finish(rq, labels: tuple, duration_ms: float) -> None:
    """Turn a sampled request's spans into Zipkin JSON (called by telemetry.finish_request)."""
    rt = rq.rt
    tracer: Tracer | None = rt.tracer
    spans = rq.trace
    if tracer is None or not spans or not rq.snap.cfg.telemetry.span_reporting:
        return  # not sampled, or Telemetry's disableSpanReporting (the context went on all the same)
    lst = rq.listener
    tel = rt.telemetry
    me = tel.me
    service = f"{me.app}.{me.namespace}"
    cs = rq.cluster
    head = rq.head
    # Envoy's span name: the route's host:port/* ("details.default.svc.cluster.local:9080/*")
    if lst.direction == "inbound":
        host = labels[11] if labels[11] != "unknown" else f"{lst.service}.{me.namespace}.svc.cluster.local"
        name = f"{host}:{lst.service_port or _port_of(head.authority, lst)}/*"  # the port the caller used
    else:
        authority = head.authority or "-"
        name = f"{authority.split(':')[0]}:{_port_of(authority, lst)}/*" if labels[11] == "unknown" \
            else f"{labels[11]}:{_port_of(authority, lst)}/*"
    ua = ""
    for k, v in head.headers:
        if k == "user-agent":
            ua = v
            break
    tags = {
        "component": "proxy",
        "node_id": rq.snap.cfg.workload.name,
        "http.method": head.method,
        "http.url": f"{head.scheme or 'http'}://{head.authority}{head.path}",
        "http.protocol": "HTTP/2" if head.http_version == "2" else f"HTTP/{head.http_version}",
        "http.status_code": labels[15],  # as telemetry records it (a gRPC error answer: 200)
        "response_flags": labels[17],
        "upstream_cluster": cs.name if cs is not None else "-",
        "downstream_cluster": "-",
        "guid:x-request-id": rq.request_id,
        "peer.address": rq.client_ip,
        "istio.canonical_service": me.app,
        "istio.namespace": me.namespace,
        "source.principal": labels[3],
        "destination.principal": labels[8],
        "source.workload": labels[1],
        "destination.workload": labels[6],
        "request_size": str(rq.body.size if rq.body is not None else 0),
        "response_size": str(rq.bytes_sent),
    }
    if ua:
        tags["user_agent"] = ua
    if labels[16]:  # gRPC: Envoy's grpc.status_code tag; a server-side gRPC error is an error
        tags["grpc.status_code"] = labels[16]
    if rq.status >= 500 or rq.status == 0 or labels[16] in GRPC_SERVER_ERRORS:
        tags["error"] = "true"
    dur = int(duration_ms * 1000)
    remote_server = labels[9] if labels[9] != "unknown" else None
    for sp in spans:
        if sp.kind == T.SERVER and len(spans) == 2:
            # the gateway's server half: the caller's view of the whole request
            tracer.add(T.zipkin_json(sp, name=name, service=service, duration_us=dur, tags=dict(tags)))
        else:
            tracer.add(T.zipkin_json(sp, name=name, service=service, duration_us=dur, tags=tags,
                                     remote_service=remote_server if sp.kind == T.CLIENT else None))


def _port_of(authority: str, lst) -> int:
    if lst.direction == "binding":
        return lst.service_port
    if lst.direction == "gateway":
        return lst.service_port or lst.port
    _, sep, port = authority.rpartition(":")
    return int(port) if sep and port.isdigit() else 80
