"""The HTTP/1.1 downstream connection: request after request on one connection.

``serve_http_connection`` is the listener handler for protocol http: it
tells HTTP/2 prior knowledge from HTTP/1.1 by the first bytes (h2conn.py
takes the former), then for each request:

    read the head (header and idle timeouts are the runtime watchdog's)
    run the listener's stage chain (stages.py); a LocalReply answers locally
    else hand the request to the forwarder (forward.py), which carries it upstream
    account: listener stats, telemetry, response flags, access log line

Failures answer the client with 503/504 and ``x-meshctl-reason`` and set an
Envoy-style response flag (UF UR UT UH NR ...) on the request for telemetry.
A malformed request gets its 4xx and a closed connection, without routing.
A client that went away is errors.DownstreamGone (flag DC), never a crash.

An answer that goes out before the request body is all read (the app answered
early: an auth rejection, a redirect, a 413, nginx's ``return``; or a local reply)
says ``connection: close`` (the exchanges, and send_local, decide that when they
write the head), and the connection is then closed in stages, not at once
(errors.linger, RFC 9112 9.6): a close with the body's bytes still unread would be a
TCP reset, which can destroy the answer in flight and fail the client's write of the
rest of its body (a sidecar in front of this one then saw no answer: 503 UR).
"""

from __future__ import annotations

import logging
import math
import time

import meshctl.proxy.aio as aio
from ..protocol.events import EndOfMessage, ProtocolError, RequestHead, ResponseHead
from ..protocol.http1 import H1Server
from . import egress
from . import stats as F
from .errors import PeerGone, linger, send_all
from .forward import Forwarder
from .pool import EventReader
from .h2entry import serve_h2
from .listener import ActiveListener
from .protocols import sniff
from .request import ConnState, Request, raw_error_response, send_local
from .snapshot import Snapshot
from .sockstream import FastClock
from .stats import ListenerStats
from .stages import default_chain
from .telemetry import finish_request

log = logging.getLogger("meshctl.proxy")

__all__ = ["serve_http_connection", "default_chain"]


async def serve_http_connection(rt, active_listener: ActiveListener, stream: aio.Stream, client_ip: str) -> None:
    """Serve requests on one downstream connection until it closes.
    Never raises for network or protocol trouble."""
    conn = ConnState(stream, rt.backend, active_listener.sock)
    rt.conns.add(conn)
    # (typed: the runtime is Any here; calls on typed native objects are native calls, once
    # per request each: a generic method call costs ~500-600 instructions)
    lstats: ListenerStats = rt.stats.listener(active_listener.spec.name)
    lstats.cx_active += 1
    lstats.cx_total += 1
    forwarder: Forwarder = rt.forwarder
    # the run's clock, read natively (sockstream.FastClock): trio.current_time() is three
    # interpreted calls, and a request asks the clock five times (idle deadline, start,
    # end; the keep-alive pool when it takes and gives back the upstream connection)
    clock = FastClock(aio.current_clock())
    snap: Snapshot = rt.snapshot
    server = H1Server(snap.limits)
    unread = False  # the connection ends with request bytes not read: close it in stages
    try:
        conn.server = server
        reader = EventReader(stream, server)
        first = True
        with conn.scope:
            # HTTP/2 prior knowledge or HTTP/1.1, told from the first bytes (h2conn.py)
            conn.deadline = clock.now() + snap.settings.request_headers_timeout
            try:
                kind, prefix = await sniff(stream)
            except PeerGone:
                return
            if kind is None:
                return
            if kind == "h2":
                await serve_h2(rt, active_listener, stream, client_ip, prefix, conn, lstats)  # (loads HTTP/2)
                return
            while True:
                if not first:  # the first head keeps the deadline set before sniffing it
                    conn.deadline = clock.now() + rt.snapshot.settings.idle_timeout
                first = False
                conn.busy = False
                if rt.closing:  # drain period over; during it, responses close their connection
                    break
                try:
                    if prefix:
                        reader.events, reader.pos, prefix = server.feed(prefix), 0, b""
                    ev = await reader.next()
                except ProtocolError as exc:
                    rt.stats.flag(F.DPE)
                    lstats.response(exc.status)
                    log.info("rejected request from %s: %s (%d)", client_ip, exc, exc.status)
                    try:
                        await send_all(stream, raw_error_response(exc.status, str(exc)))
                    except PeerGone:
                        pass
                    unread = True  # (the rest of what the client sent)
                    break
                except PeerGone:
                    break
                if ev is None or type(ev) is not RequestHead:
                    break
                if ev.upgrade == "connect" and active_listener.spec.direction == "outbound" and egress.tunnels(
                        rt.snapshot, active_listener.spec.route_table, ev.authority):
                    # HTTPS through HTTPS_PROXY, or a host outside the mesh: a TCP tunnel (egress.py)
                    if type(reader.peek()) is EndOfMessage:
                        reader.pos += 1
                    await egress.tunnel(rt, rt.snapshot, server, active_listener.spec.route_table, ev.authority, stream)
                    break
                if ev.upgrade == "connect" and active_listener.spec.direction == "outbound":
                    # Node's fetch with NODE_USE_ENV_PROXY=1 tunnels plain-HTTP requests too
                    # (CONNECT backend:9080): accept, and serve what comes through the tunnel
                    # as requests made to this listener, routed by their Host.
                    if type(reader.peek()) is EndOfMessage:
                        reader.pos += 1
                    try:
                        await send_all(stream, server.response_head(ResponseHead(200, [], reason="Connection established")))
                    except PeerGone:
                        break
                    prefix = server.upgrade_accepted()
                    server.release()
                    server = H1Server(snap.limits)
                    reader = EventReader(stream, server)
                    first = True
                    continue
                conn.busy = True
                conn.deadline = math.inf
                snap = rt.snapshot
                listener = active_listener.spec
                rq = Request(ev, listener, snap, rt, client_ip, server, reader, stream)
                rq.clock = clock
                conn.rq = rq
                conn.since = clock.now()
                nxt = reader.peek()
                if type(nxt) is EndOfMessage:
                    reader.pos += 1
                    rq.body_done = True
                try:
                    reply = None
                    for decide, stage in active_listener.steps_for(snap):
                        reply = decide(rq) if decide is not None else await stage.on_request(rq)
                        if reply is not None:
                            break
                    if reply is not None:
                        if not rq.body_done:
                            rq.keep_alive = False  # unread body: cannot frame the next request
                        await send_local(rq, reply)
                    else:
                        await forwarder.run(rq)  # (and the route's mirrors: forward.py)
                except PeerGone:  # DownstreamGone, or an upstream gone in a way no try reported
                    rq.keep_alive = False
                    rq.flags.append(F.DC)
                except ProtocolError as exc:  # malformed body from the client
                    rq.keep_alive = False
                    rq.flags.append(F.DPE)
                    unread = True
                    if not rq.response_started:
                        rq.status = exc.status
                        try:
                            await send_all(stream, raw_error_response(exc.status, str(exc)))
                        except PeerGone:
                            pass
                if rq.status:
                    lstats.response(rq.status)
                finish_request(rq, conn.since, clock.now(), time.time())
                for f in rq.flags:
                    rt.stats.flag(f)
                if rq.flags and rq.flags[0] not in (F.DC,):
                    log.info(
                        "%s %s %s -> %d %s %s",
                        listener.name, rq.head.method, rq.head.authority + rq.head.path, rq.status,
                        ",".join(rq.flags), rq.detail,
                    )
                if not rq.keep_alive or (rq.body is not None and not rq.body.finished):
                    # (an unread body made the answer say close: the exchanges, send_local)
                    unread = unread or not rq.body_read()
                    if F.DC in rq.flags:
                        unread = False  # the client is gone: nothing to wait for
                    break
    finally:
        server.release()  # (freed with the connection, not by the cyclic GC: http1.release)
        conn.busy = False
        rt.conns.discard(conn)
        try:
            if unread:
                await linger(stream)  # (still open, and counted: cx_active, as in max_connections)
        finally:
            lstats.cx_active -= 1
            if hasattr(stream, "close_now"):
                stream.close_now()
            else:
                with aio.CancelScope(shield=True):
                    await stream.aclose()


