"""Opaque TCP for binding listeners with protocol tcp.

Pick a cluster (weighted tcp route, or the service's cluster), pick a
healthy endpoint, connect within the connect timeout (up to 3 tries, each
avoiding the endpoints already tried), then relay bytes both
ways (os.splice when both legs are plain sockets), propagating half-close.
On connect failure the downstream connection is closed (there is no status
to send in TCP); the failure is logged and counted (UF).
"""

from __future__ import annotations

import logging

import meshctl.proxy.aio as aio
from ..core.balance import PickContext
from . import stats as F
from .request import ConnState
from .identity import upstream_tls
from .stream import UpstreamConnectError, relay
from .telemetry import tcp_closed, tcp_opened

log = logging.getLogger("meshctl.proxy")


async def serve_tcp_connection(rt, active_listener, stream: aio.Stream, client_ip: str) -> None:
    listener = active_listener.spec
    lstats = rt.stats.listener(listener.name)
    lstats.cx_active += 1
    lstats.cx_total += 1
    snap = rt.snapshot
    conn = ConnState(stream, rt.backend, active_listener.sock)
    conn.busy = True  # an opaque stream is never "between requests": drain waits for it
    rt.conns.add(conn)
    limiter = None  # the cluster's connectionPool limits (limits.py), while this connection counts
    try:
        with conn.scope:
            if listener.direction == "inbound":  # to the app (mTLS, if any, was terminated by the runtime)
                cs = snap.listener_clusters.get(listener.name)
            else:
                cs = snap.pick_tcp_cluster(listener, rt.rand)
            if cs is None or not cs.healthy:
                rt.stats.flag(F.UH)
                log.info("%s: no healthy upstream for tcp connection from %s", listener.name, client_ip)
                return
            if cs.limiter is not None:
                if not cs.limiter.tcp_open():
                    rt.stats.flag(F.UO)
                    log.info("%s: %s: tcp.maxConnections (%d) reached, closing the connection from %s",
                             listener.name, cs.name, cs.limiter.limits.max_connections, client_ip)
                    return
                limiter = cs.limiter
            connect_timeout = snap.settings.connect_timeout if limiter is None else limiter.limits.connect_timeout
            upstream = None
            tried = 0
            ctx = PickContext(source_ip=client_ip, active=rt.active)
            while upstream is None and tried < max(1, min(3, len(cs.healthy))):
                eps = cs.candidates(aio.current_time(), rt.rand) if cs.shaped else cs.healthy
                ep = cs.balancer.pick(eps, ctx, rt.rand)
                if ep is None:
                    break
                tried += 1
                with aio.move_on_after(connect_timeout):
                    try:
                        tls = upstream_tls(rt, cs.cluster, ep)  # mTLS to a sidecar (identity.py)
                        raw = await rt.backend.connect(ep.address, ep.port)
                        upstream = raw if tls is None else await tls.wrap(raw, ep.address, ep.port)
                    except UpstreamConnectError as exc:
                        cs.stats.cx_connect_fail += 1
                        log.info("%s: %s", listener.name, exc)
                if upstream is None:  # the next try avoids this endpoint (as HTTP retries do, forward.py)
                    ctx = PickContext(source_ip=client_ip, active=rt.active, avoid=ctx.avoid | {(ep.address, ep.port)})
            if upstream is None:
                rt.stats.flag(F.UF)
                return
            cs.stats.cx_active += 1
            cs.stats.cx_total += 1
            tst = tcp_opened(rt, listener, cs, ep, getattr(stream, "peer_id", None))
            counts = (0, 0)
            try:
                counts = await relay(stream, upstream)
            finally:
                tcp_closed(tst, counts)
                cs.stats.cx_active -= 1
                await upstream.aclose()
    finally:
        if limiter is not None:
            limiter.tcp_closed()
        rt.conns.discard(conn)
        lstats.cx_active -= 1
        with aio.CancelScope(shield=True):
            await stream.aclose()
