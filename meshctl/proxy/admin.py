"""The admin server (Envoy's :15000 in spirit), plain HTTP/1.1 on loopback.

    GET /ready   200 "ready" once listeners are up, 503 "draining" while draining
    GET /config  the running ProxyConfig as JSON (dump_proxy_config), with its version;
                 only with the mesh credential (header values routes set, ext-authz
                 headers such as API keys, collector and ext-authz URLs)
    GET /stats   Prometheus text: cluster, listener and response-flag counters, and
                 Istio's standard metrics (istio_requests_total, ...; telemetry.py)
    GET /metrics the same
    GET /traces  JSON: the last sampled spans (Zipkin v2), for Mixer's trace list; only
                 with the mesh credential (``Authorization: Bearer``): URLs and
                 request ids of real requests, tokens in query strings included
    GET /mirror  JSON: shadow requests compared with their primaries (paths with query
                 strings, both answers' headers, set-cookie included), for `meshctl
                 mirror diff`; only with the mesh credential
    GET /listeners  JSON: listener name → bound address (useful with port 0)
    GET /clusters   JSON: every cluster's endpoints as this proxy sees them now:
                 health from Pilot, and outlier detection's ejections
"""

from __future__ import annotations

import json
import logging
import socket

import meshctl.proxy.aio as aio
from ..protocol.events import EndOfMessage, ProtocolError, RequestHead, ResponseHead
from ..protocol.http1 import H1Server
from .errors import PeerGone, send_all
from .pool import EventReader
from .stream import FastSocketStream, accept

log = logging.getLogger("meshctl.proxy.admin")


def _dump_config(rt) -> dict:
    from ..loader.proxyconfig import dump_proxy_config

    cfg = rt.config
    data = dump_proxy_config(cfg)
    if isinstance(data, dict):
        data.setdefault("version", cfg.version)
    return data


def clusters_status(rt, now: float) -> dict:
    """cluster → endpoints with the proxy's own view: ejected by outlier detection, until when."""
    snap = rt.snapshot
    if snap is None:
        return {}
    out = {}
    for name, cs in snap.clusters.items():
        status = cs.outlier.status(now) if cs.outlier is not None else {}
        eps = []
        for ep in cs.cluster.endpoints:
            st = status.get((ep.address, ep.port))
            eps.append({
                "address": f"{ep.address}:{ep.port}",
                "instance": ep.instance,
                "health": ep.health,
                "ejected": bool(st and st.ejected),
                "ejected_for": round(st.until - now, 1) if st and st.ejected and st.until else None,
                "times_ejected": st.times_ejected if st else 0,
                "ejections_total": st.ejections_total if st else 0,
            })
        out[name] = eps
    return out


# what carries request data or secrets: any local user may connect to loopback, so these
# answer the mesh credential only (docs/control-plane-security.md); the rest are labels
MESH_ONLY = ("/traces", "/config", "/mirror")


def handle(rt, method: str, path: str, authorization: str | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) for one admin request."""
    path = path.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"method not allowed\n"
    if path in MESH_ONLY:
        from ..credentials import Unauthenticated, check_mesh

        try:
            check_mesh(authorization, rt.admin_verifier)
        except Unauthenticated as e:
            return 401, "application/json", json.dumps({"error": str(e), "reason": "unauthenticated"}).encode()
    if path == "/ready":
        if rt.draining:
            return 503, "text/plain", b"draining\n"
        if not rt.ready:
            return 503, "text/plain", b"starting\n"
        return 200, "text/plain", b"ready\n"
    if path in ("/stats", "/metrics"):
        from .telemetry import runtime_gauges

        text = rt.stats.render() + rt.mirrors.render() + rt.telemetry.render(runtime_gauges(rt, aio.current_time()))
        if path == "/metrics" and rt.config is not None and rt.config.telemetry.metric_overrides:
            # Istio Telemetry metric overrides shape what Prometheus scrapes; /stats (Mixer, `top`) stays whole
            from .metric_overrides import apply_metric_overrides

            text = apply_metric_overrides(text, rt.config.telemetry.metric_overrides)
        return 200, "text/plain; version=0.0.4", text.encode()
    if path == "/traces":  # the last sampled spans, Zipkin v2 JSON (Mixer's trace list: mixer/dashboard.py)
        tracer = rt.tracer
        return 200, "application/json", json.dumps(list(tracer.recent) if tracer is not None else []).encode()
    if path == "/config":
        if rt.config is None:
            return 503, "text/plain", b"no config yet\n"
        return 200, "application/json", (json.dumps(_dump_config(rt), indent=2) + "\n").encode()
    if path == "/mirror":  # shadow requests compared with the primaries (mirror.py), for `meshctl mirror diff`
        return 200, "application/json", json.dumps(rt.mirrors.report()).encode()
    if path == "/clusters":
        return 200, "application/json", (json.dumps(clusters_status(rt, aio.current_time()), indent=1) + "\n").encode()
    if path == "/listeners":
        out = {name: f"{al.spec.address}:{al.bound_port}" for name, al in rt.listeners.items()}
        return 200, "application/json", (json.dumps(out) + "\n").encode()
    return 404, "text/plain", b"not found: try /ready /config /stats /clusters /listeners\n"


async def serve_conn(rt, stream: FastSocketStream) -> None:
    """Answer admin requests on one connection (keep-alive honoured)."""
    server = H1Server()
    reader = EventReader(stream, server)
    try:
        with aio.move_on_after(30):
            while True:
                head = await reader.next()
                if type(head) is not RequestHead:
                    return
                ev = head
                while type(ev) is not EndOfMessage:
                    ev = await reader.next()
                    if ev is None:
                        return
                try:
                    auth = next((v for k, v in head.headers if k.lower() == "authorization"), None)
                    status, ctype, body = handle(rt, head.method, head.path, auth)
                except Exception as exc:  # a bug here must not kill the proxy
                    log.exception("admin %s failed", head.path)
                    status, ctype, body = 500, "text/plain", f"internal error: {exc}\n".encode()
                resp = ResponseHead(
                    status=status,
                    headers=[("content-type", ctype), ("content-length", str(len(body)))]
                    + ([("www-authenticate", "Bearer")] if status == 401 else []),
                    keep_alive=head.keep_alive,
                )
                out = server.response_head(resp)
                if head.method != "HEAD":
                    out += server.data(body)
                out += server.end()
                await send_all(stream, out)
                if not server.keep_alive:
                    return
    except (ProtocolError, PeerGone):
        pass
    finally:
        server.release()
        stream.close_now()


async def serve_admin(rt, sock: socket.socket, *, task_status=aio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin API on an already-bound listening socket until cancelled."""
    task_status.started(sock.getsockname()[1])
    try:
        async with aio.open_nursery() as nursery:
            while True:
                conn, _ = await accept(sock)
                nursery.start_soon(serve_conn, rt, FastSocketStream(conn))
    finally:
        sock.close()
